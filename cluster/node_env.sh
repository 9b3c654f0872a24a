#!/usr/bin/env bash
# Writes ~/strata-env.sh, which every `ray start` in cluster/aws.yaml sources: Ray processes on the node inherit it,
# so jobs, Train workers and Serve replicas find the bucket, the tracking server and the auth mode without flags.
# Usage: node_env.sh BUCKET
set -euo pipefail
bucket="${1:?usage: node_env.sh BUCKET}"
cat > "$HOME/strata-env.sh" <<ENV
export STRATA_S3_BUCKET=$bucket
# Runs and the registry on the head's MLflow server; artifacts go through it to s3://$bucket/mlflow.
export MLFLOW_TRACKING_URI=http://\${RAY_HEAD_IP:-127.0.0.1}:5000
# Token authentication (Ray 2.60): the token is ~/.ray/auth_token, mounted from the machine that ran \`ray up\`.
export RAY_AUTH_MODE=token
export STRATA_HOME=\$HOME/strata-home
ENV
mkdir -p "$HOME/strata-home"
