#!/usr/bin/env bash
# Prints this EC2 instance's lifecycle, "spot" or "on-demand", from the instance metadata service (IMDSv2).
set -euo pipefail
imds=http://169.254.169.254
token=$(curl -sf -X PUT "$imds/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 60")
curl -sf -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/instance-life-cycle"
