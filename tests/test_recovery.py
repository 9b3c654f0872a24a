"""Real faults on a real Ray: a SIGKILLed worker and a killed driver cost at most one checkpoint interval,
and the resumed run ends with weights bit-identical to an uninterrupted one."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from raycluster import FakeAutoscalingCluster, FakeMetadataService, LocalCluster, start_job, start_spot_watcher
from safetensors.torch import load_file

from strata.config import PretrainConfig
from strata.paths import fetched
from strata.train.faults import WorkerKiller, latest_checkpoint_step, wait_for_checkpoint
from strata.train.pretrain import pretrain_loop_config, run_pretraining
from strata.train.pretrain_loop import MODEL_DIR

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 30


def recovery_config(data_cfg, home: Path, run_name: str) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "run_name": run_name,
            "data": data_cfg.model_dump(),
            "optim": {
                "lr": 3e-3,
                "warmup_steps": 3,
                "max_steps": MAX_STEPS,
                "micro_batch_size": 4,
                "global_batch_size": 16,
            },
            "checkpoint": {"every_steps": 10, "keep_last": 2, "storage_path": str(home / "runs")},
            "scaling": {"num_workers": 2},
            "tracking": {
                "tracking_uri": f"sqlite:///{home}/mlruns/mlflow.db",
                "experiment": "recovery",
                "registered_model": None,
                "log_every_steps": 5,
            },
        }
    )


def final_weights(config: PretrainConfig) -> dict:
    checkpoint = Path(config.checkpoint.storage_path) / config.run_name / f"checkpoint_{MAX_STEPS:07d}"
    return load_file(checkpoint / MODEL_DIR / "model.safetensors")


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(ray_session, small_data, tmp_path_factory):
    home = tmp_path_factory.mktemp("straight")
    config = recovery_config(small_data[0], home, "straight")
    run_pretraining(config)
    return final_weights(config)


def test_sigkilled_worker_resumes_from_checkpoint_bit_identical_from_object_storage_alone(
    ray_session, object_store, small_data, uninterrupted, tmp_path
):
    """As on a cluster without a shared disk: workers read the tokenizer and packed tokens from s3:// (row group by
    row group) and checkpoint to s3://, and the resumed run still ends bit-identical to the local uninterrupted one."""
    tree = recovery_config(small_data[0], tmp_path, "killed-worker").model_dump(mode="json")
    tree["data"]["publish_to"] = f"{object_store}/data"
    tree["checkpoint"]["storage_path"] = f"{object_store}/{tmp_path.name}"
    config = PretrainConfig.model_validate(tree)
    loop_config, data = pretrain_loop_config(config)
    assert all(p.startswith(f"{object_store}/data/") for p in loop_config["paths"].values()), loop_config["paths"]

    # The local packed tokens go away while the run lasts (the manifest stays, so nothing is packed again): every
    # sequence a worker trains on comes from s3://.
    local_tokens = Path(data.packed_dir) / "tokens.parquet"
    local_tokens.rename(tmp_path / "tokens.parquet")
    run_dir = f"{config.checkpoint.storage_path}/killed-worker"
    killer = WorkerKiller(run_dir, after_step=10, delay_s=0).start()
    try:
        result = run_pretraining(config)
    finally:
        (tmp_path / "tokens.parquet").rename(local_tokens)
    killer.join(timeout=5)
    assert killer.killed_pid, "the fault was never injected"
    # Killed mid-run, once checkpoint 10 was registered; how far training got by then depends on the machine.
    assert killer.checkpoint_at_kill is not None and 10 <= killer.checkpoint_at_kill < MAX_STEPS

    with fetched(f"{run_dir}/checkpoint_{MAX_STEPS:07d}") as checkpoint:
        assert_bit_identical(load_file(Path(checkpoint) / MODEL_DIR / "model.safetensors"), uninterrupted)
    client = MlflowClient(config.tracking.tracking_uri)
    resumed = client.get_metric_history(result.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [killer.checkpoint_at_kill]  # the latest checkpoint, not step 0
    lost = client.get_metric_history(result.run_id, "recovery_steps_lost")
    assert len(lost) == 1 and 0 <= lost[0].value <= 10  # at most one checkpoint interval
    assert client.get_metric_history(result.run_id, "recovery_seconds_to_resume")[0].value > 0
    assert client.get_run(result.run_id).data.metrics["recovery_worker_failures"] >= 1


def test_a_run_without_failure_budget_fails_at_the_first_killed_worker_and_keeps_its_checkpoint(
    ray_session, small_data, tmp_path
):
    """`checkpoint.max_failures: 0` reaches Ray Train: the SIGKILL ends the run instead of resuming it, and the
    checkpoint taken before it is still registered for a rerun to resume from."""
    tree = recovery_config(small_data[0], tmp_path, "no-retries").model_dump(mode="json")
    tree["checkpoint"].update(every_steps=5, max_failures=0)
    config = PretrainConfig.model_validate(tree)
    run_dir = Path(config.checkpoint.resolved_storage_path) / "no-retries"
    killer = WorkerKiller(run_dir, after_step=5, delay_s=0).start()
    with pytest.raises(ray_session.train.WorkerGroupError):
        run_pretraining(config)
    killer.join(timeout=5)
    assert killer.killed_pid, "the fault was never injected"
    assert 5 <= latest_checkpoint_step(run_dir) < MAX_STEPS


def test_killed_driver_rerun_with_same_name_resumes_bit_identical(small_data, uninterrupted, tmp_path):
    config = recovery_config(small_data[0], tmp_path, "killed-driver")
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    command = [sys.executable, str(ROOT / "jobs/pretrain.py"), "--config", str(config_file)]
    env = {**os.environ, "STRATA_HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)

    # The driver starts its own local Ray; killing its whole process group is losing the head node.
    driver = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    run_dir = tmp_path / "runs" / "killed-driver"
    try:
        wait_for_checkpoint(run_dir, 10)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    wait_until_group_is_gone(driver.pid)  # no Ray process of the run is left to register a checkpoint
    checkpoint_at_kill = latest_checkpoint_step(run_dir)
    assert checkpoint_at_kill is not None and 10 <= checkpoint_at_kill < MAX_STEPS  # killed mid-run

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_bit_identical(final_weights(config), uninterrupted)
    client = MlflowClient(config.tracking.tracking_uri)
    run_id = client.search_runs([client.get_experiment_by_name("recovery").experiment_id])[0].info.run_id
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [checkpoint_at_kill]
    lost = client.get_metric_history(run_id, "recovery_steps_lost")
    assert len(lost) == 1 and lost[0].value <= 10


def wait_until_group_is_gone(pgid: int, timeout: float = 60) -> None:
    """Until no live process (zombies aside: nothing here may reap them) is left in process group `pgid`."""

    def alive(process: psutil.Process) -> bool:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            return os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE
        return False

    deadline = time.time() + timeout
    while any(alive(p) for p in psutil.process_iter()):
        assert time.time() < deadline, f"processes of group {pgid} outlived SIGKILL"
        time.sleep(0.1)


def test_spot_notice_gives_a_just_in_time_checkpoint_and_loses_no_step(small_data, uninterrupted, tmp_path):
    """On cluster/aws.yaml's node types (Ray's fake autoscaler): the job asks for `spot`, the autoscaler launches a
    train-spot-g6e node A; the watcher on A sees the notice and drains A; the loop checkpoints at once; A is then
    reclaimed (killed), the autoscaler replaces it with node B and training resumes there from that checkpoint."""
    imds = FakeMetadataService()
    cluster = FakeAutoscalingCluster(
        ROOT / "cluster" / "aws.yaml",
        env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"},
    )
    watcher = driver = None
    try:
        config = recovery_config(small_data[0], tmp_path, "spot")
        tree = config.model_dump(mode="json")
        tree["scaling"]["resources_per_worker"] = {"train_gpu": 1, "spot": 1}
        config_file = tmp_path / "job.yaml"
        config_file.write_text(yaml.safe_dump(tree))
        driver = start_job(
            cluster, ROOT / "jobs/pretrain.py", ["--config", str(config_file)], {"STRATA_HOME": str(tmp_path)}
        )

        deadline = time.time() + 300
        while not (launched := cluster.node_ids("train-spot-g6e")):  # launched for the job: both workers fit on it
            assert time.time() < deadline and driver.poll() is None, "no train-spot-g6e node came up for the job"
            time.sleep(0.5)
        [spot_a] = launched
        # Polling before the notice, as on a real node: the notice must reach the loop before step 30 ends the run.
        watcher = start_spot_watcher(cluster, None, imds.url, ROOT / "platform", node_id=spot_a)
        run_dir = tmp_path / "runs" / "spot"
        wait_for_checkpoint(run_dir, 10)
        imds.arm(seconds_left=20)
        assert watcher.wait(timeout=60) == 0, watcher.stdout.read()
        jit_step = wait_for_extra_checkpoint(run_dir, regular={10, 20, 30})
        cluster.reclaim(spot_a)
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-4000:]
        workers, launched_as = cluster.actor_nodes("RayTrainWorker"), cluster.node_types(include_dead=True)
    finally:
        for process in (watcher, driver):
            if process and process.poll() is None:
                process.kill()
        cluster.shutdown()
        imds.server.shutdown()

    # Two workers on A, then two on the replacement B: a node of a spot group (either family: the job asks for
    # `spot`), launched by the autoscaler for the restarted group.
    assert workers.count(spot_a) == 2 and len(workers) == 4, workers
    [spot_b] = set(workers) - {spot_a}
    assert workers.count(spot_b) == 2 and launched_as[spot_b] in {"train-spot-g6e", "train-spot-g5"}, launched_as
    # After the step-10 checkpoint (the notice comes then) and off the periodic grid; how many steps run before
    # the watcher's poll sees the notice depends on the machine's speed.
    assert jit_step > 10 and jit_step % 10
    assert_bit_identical(final_weights(config), uninterrupted)
    client = MlflowClient(config.tracking.tracking_uri)
    run_id = client.search_runs([client.get_experiment_by_name("recovery").experiment_id])[0].info.run_id
    assert [m.value for m in client.get_metric_history(run_id, "preemption_checkpoint_step")] == [jit_step]
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [jit_step]
    assert [m.value for m in client.get_metric_history(run_id, "recovery_steps_lost")] == [0.0]


def wait_for_extra_checkpoint(run_dir: Path, regular: set[int], timeout: float = 120) -> int:
    """The step of the first registered checkpoint that is not one of the periodic ones."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = (
            {int(s) for s in re.findall(r"checkpoint_(\d{7})", snapshot.read_text())} if snapshot.exists() else set()
        )
        if steps - regular:
            return min(steps - regular)
        time.sleep(0.1)
    raise AssertionError("no just-in-time checkpoint was registered")


def test_elastic_group_grows_when_capacity_returns_and_keeps_the_global_batch(small_data, tmp_path):
    cluster = LocalCluster(head_cpus=0)
    driver = None
    try:
        cluster.add_node("a", cpus=1, resources={"elastic": 1})  # capacity for one worker only
        config = recovery_config(small_data[0], tmp_path, "elastic")
        tree = config.model_dump(mode="json")
        tree["optim"].update(max_steps=100, global_batch_size=8)  # Ray re-reads the cluster every 20 s
        tree["checkpoint"]["every_steps"] = 10
        tree["scaling"].update(
            num_workers=2, min_workers=1, elastic_resize_interval_s=2, resources_per_worker={"elastic": 1}
        )
        config_file = tmp_path / "job.yaml"
        config_file.write_text(yaml.safe_dump(tree))
        driver = start_job(
            cluster, ROOT / "jobs/pretrain.py", ["--config", str(config_file)], {"STRATA_HOME": str(tmp_path)}
        )
        wait_for_checkpoint(tmp_path / "runs" / "elastic", 10)
        cluster.add_node("b", cpus=1, resources={"elastic": 1})  # capacity returns
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-4000:]
    finally:
        if driver and driver.poll() is None:
            driver.kill()
        cluster.shutdown()

    client = MlflowClient(config.tracking.tracking_uri)
    run_id = client.search_runs([client.get_experiment_by_name("recovery").experiment_id])[0].info.run_id
    by_step = lambda key: {m.step: m.value for m in client.get_metric_history(run_id, key)}  # noqa: E731
    world, accum = by_step("world_size"), by_step("grad_accum")
    sizes = [world[s] for s in sorted(world)]
    assert sizes[0] == 1 and sizes[-1] == 2 and sizes == sorted(sizes), sizes  # started small, then grew
    micro = tree["optim"]["micro_batch_size"]
    assert {world[s] * accum[s] * micro for s in world} == {8}  # the global batch never changed
