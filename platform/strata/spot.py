"""Spot interruption notices: watch the instance metadata service and tell Ray the node is being preempted.

AWS posts `/latest/meta-data/spot/instance-action` (`{"action": "terminate", "time": "...Z"}`) about two
minutes before it reclaims a spot instance; the endpoint answers 404 until then. Reading it takes an IMDSv2
session token. On a notice the watcher drains this Ray node with reason PREEMPTION and the reclaim deadline;
Ray Train's preemption watcher sees the drain, `ray.train.get_preemption_info()` turns non-empty in the
training loop, and the loop writes a just-in-time checkpoint (see `strata.train.trainer.PreemptionGuard`).

Run one watcher per spot node (the cluster YAML starts it next to `ray start`):
`strata spot-watch --address HEAD:6379` (`--metadata-url http://127.0.0.1:PORT` to test against a fake).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

AWS_METADATA_URL = "http://169.254.169.254"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_PATH = "/latest/api/token"
DEFAULT_NOTICE_S = 120  # AWS's notice period, used when a notice carries no parsable time

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpotNotice:
    action: str
    deadline_s: float  # unix time at which the instance goes away

    @property
    def seconds_left(self) -> int:
        return max(0, int(self.deadline_s - time.time()))


def parse_notice(body: bytes, now: float | None = None) -> SpotNotice:
    now = time.time() if now is None else now
    payload = json.loads(body)
    try:
        when = datetime.strptime(payload["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (KeyError, ValueError):
        when = now + DEFAULT_NOTICE_S
    return SpotNotice(action=str(payload.get("action", "terminate")), deadline_s=when)


class MetadataClient:
    """IMDSv2: a session token from PUT /latest/api/token, then GETs that carry it."""

    def __init__(self, base_url: str = AWS_METADATA_URL, timeout_s: float = 2.0, token_ttl_s: int = 21600):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.token_ttl_s = token_ttl_s
        self._token: tuple[str, float] | None = None

    def _token_value(self) -> str:
        if self._token is None or time.time() > self._token[1]:
            request = urllib.request.Request(
                self.base_url + TOKEN_PATH,
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)},
            )
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                self._token = (response.read().decode(), time.time() + self.token_ttl_s - 60)
        return self._token[0]

    def spot_notice(self) -> SpotNotice | None:
        request = urllib.request.Request(
            self.base_url + INSTANCE_ACTION_PATH, headers={"X-aws-ec2-metadata-token": self._token_value()}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return parse_notice(response.read())
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None  # no interruption scheduled
            if err.code == 401:
                self._token = None  # expired token: fetch a new one next time
                return None
            raise


def drain_for_preemption(gcs_address: str, node_id: str, notice: SpotNotice) -> None:
    """Ray's drain API with reason PREEMPTION (what `ray drain-node` calls); it kills nothing itself."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    accepted, why = GcsClient(address=gcs_address).drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        f"spot instance {notice.action} notice",
        int(notice.deadline_s * 1000),
    )
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")


def find_node_id(gcs_address: str, node_name: str | None = None) -> str:
    """The Ray node named `node_name` (`ray start --node-name`), else the one on this host's IP address."""
    import ray
    from ray._private.services import get_node_ip_address

    ray.init(address=gcs_address, logging_level=logging.WARNING)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if node_name:
            nodes = [n for n in alive if n.get("NodeName") == node_name]
        else:
            nodes = [n for n in alive if n["NodeManagerAddress"] == get_node_ip_address()]
        if len(nodes) != 1:
            raise RuntimeError(f"expected one live Ray node, found {len(nodes)}; pass --node-id or --node-name")
        return nodes[0]["NodeID"]
    finally:
        ray.shutdown()


def watch(gcs_address: str, node_id: str, client: MetadataClient, poll_interval_s: float = 5.0) -> SpotNotice:
    """Poll until a notice arrives, drain the node, and return the notice."""
    while True:
        try:
            notice = client.spot_notice()
        except (urllib.error.URLError, OSError) as err:
            log.warning("instance metadata unreachable (%s); retrying", err)
            notice = None
        if notice is not None:
            log.warning("spot %s notice: draining node %s, %ss left", notice.action, node_id, notice.seconds_left)
            drain_for_preemption(gcs_address, node_id, notice)
            return notice
        time.sleep(poll_interval_s)
