"""Analyses started through the Prefect API (or in this process) and waited for, with a deadline."""

from __future__ import annotations

import time
from typing import Any

from polysemantic_disentangle.flows.params import PipelineParams

def flow_run_state(flow_run_id: str | None) -> Any | None:
    """The state of a flow run, or None when unknown (no id, API unreachable)."""
    if not flow_run_id:
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).state
    except Exception:  # noqa: BLE001 - any API problem means "unknown", never a crash
        return None


def analyse_in_process(params: PipelineParams, name: str) -> tuple[str, str | None, Any, str | None]:
    """Run `disentangle-all-layers` as a subflow: (status, flow run id, result, error)."""
    from polysemantic_disentangle.flows.pipeline import disentangle_all_layers

    state = disentangle_all_layers.with_options(flow_run_name=name)(params=params, return_state=True)
    run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    if state.is_completed():
        return "completed", run_id, state.result(), None
    try:
        state.result()
        error = state.message
    except BaseException as exc:  # noqa: BLE001 - the subflow's own error, recorded verbatim
        error = f"{type(exc).__name__}: {exc}"
    return "failed", run_id, None, error or state.name


def wait_for(flow_run_ids: list[str], poll_s: float, timeout_s: float | None = None) -> dict[str, Any]:
    """Final states of the runs that finished within ``timeout_s`` (None: no deadline); the
    others are left out: a pool without a worker must not hold the scan forever."""
    from prefect.client.orchestration import get_client

    states: dict[str, Any] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while len(states) < len(flow_run_ids):
            for run_id in flow_run_ids:
                if run_id not in states:
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.is_final():
                        states[run_id] = state
            if len(states) < len(flow_run_ids):
                if deadline is not None and time.monotonic() + poll_s > deadline:
                    break
                time.sleep(poll_s)
    return states
