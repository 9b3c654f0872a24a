"""The MLflow run of a run name, on a real sqlite store: params logged on every start, changes kept visible."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from strata import tracking


def start(params: dict) -> str:
    with tracking.start_run("tracking-test", "resumed", params) as run:
        return run.info.run_id


def test_a_continued_run_logs_new_params_and_shows_changed_values(strata_home):
    tracking.use_store()
    run_id = start({"optim.max_steps": 30, "optim.lr": 0.003})
    # A resume with a higher max_steps and a field the first start did not have.
    assert start({"optim.max_steps": 40, "optim.lr": 0.003, "model.overrides.num_experts": 16}) == run_id

    client = MlflowClient()
    data = client.get_run(run_id).data
    assert data.params == {"optim.max_steps": "30", "optim.lr": "0.003", "model.overrides.num_experts": "16"}
    assert data.tags[tracking.PARAM_TAG + "optim.max_steps"] == "40"  # the value in effect
    assert tracking.PARAM_TAG + "optim.lr" not in data.tags
    experiment_id = client.get_run(run_id).info.experiment_id
    changes = client.load_table(experiment_id, tracking.CONFIG_CHANGES, run_ids=[run_id])
    assert changes[["param", "logged_value", "value"]].astype(str).values.tolist() == [["optim.max_steps", "30", "40"]]

    start({"optim.max_steps": 30, "optim.lr": 0.003, "model.overrides.num_experts": 16})  # back as logged
    assert tracking.PARAM_TAG + "optim.max_steps" not in client.get_run(run_id).data.tags
    assert len(client.load_table(experiment_id, tracking.CONFIG_CHANGES, run_ids=[run_id])) == 1
