"""The rollout engine's group and device rules: hawkBit's success and error thresholds, AWS IoT
Jobs' retries, timeouts and abort criteria, and the rate limit."""

from __future__ import annotations

from controller.rollout.events import Audit, Decision, Start, Tick
from controller.rollout.model import PauseCause
from tests.rollout_helpers import (
    CS,
    D,
    G,
    R,
    audit,
    config,
    decisions,
    deploys,
    device,
    ids,
    report,
    rollout,
    run,
    states,
    status,
)

# --- hawkBit's group rules ---------------------------------------------------------------------

def test_hawkbit_success_threshold_reached_moves_on_to_the_next_group() -> None:
    snapshot, _ = run(rollout(4, 3, cfg=config(success_threshold_percent=50,
                                               error_threshold_percent=50)), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)

    below, actions = run(snapshot, Tick(now=2))
    assert states(below) == [G.RUNNING, G.PENDING] and not deploys(actions)

    snapshot = report(below, ["d0-1"], CS.SUCCEEDED, 3)   # 2 of 4 = 50%: >= is enough
    snapshot, actions = run(snapshot, Tick(now=4))

    assert states(snapshot) == [G.SUCCEEDED, G.RUNNING]
    assert [a.device_id for a in deploys(actions)] == ids(1, 3)
    reached = audit(actions, Decision.SUCCESS_THRESHOLD_REACHED)
    assert reached.group == 0
    assert reached.details == {"succeeded": 2, "total": 4, "succeeded_percent": 50.0,
                               "threshold_percent": 50, "soak_s": 0.0}


def test_hawkbit_error_threshold_pauses_the_rollout() -> None:
    cfg = config(success_threshold_percent=75, error_threshold_percent=25)
    snapshot, _ = run(rollout(4, 2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.FAILED, 1)

    at_limit, _ = run(snapshot, Tick(now=2))             # 1 of 4 = 25%: not over 25%
    assert at_limit.state is R.RUNNING

    snapshot = report(at_limit, ["d0-1"], CS.FAILED, 3)
    snapshot, actions = run(snapshot, Tick(now=4))

    assert snapshot.state is R.PAUSED and snapshot.paused_by is PauseCause.ERROR_THRESHOLD
    assert "2 of 4 devices failed" in snapshot.reason
    assert states(snapshot) == [G.RUNNING, G.PENDING]
    assert audit(actions, Decision.ERROR_THRESHOLD_EXCEEDED).details == {
        "failed": 2, "acknowledged": 0, "total": 4, "failed_percent": 50.0,
        "threshold_percent": 25}


def test_hawkbit_error_condition_is_checked_before_the_success_condition() -> None:
    snapshot, _ = run(rollout(4, 2, cfg=config(success_threshold_percent=50,
                                               error_threshold_percent=25)), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.SUCCEEDED, 1)
    snapshot = report(snapshot, ids(0, 2, first=2), CS.FAILED, 1)

    snapshot, actions = run(snapshot, Tick(now=2))        # both conditions hold

    assert snapshot.state is R.PAUSED
    assert states(snapshot) == [G.RUNNING, G.PENDING]
    assert not deploys(actions)
    assert Decision.SUCCESS_THRESHOLD_REACHED not in decisions(actions)


def test_hawkbit_empty_group_counts_as_success() -> None:
    # g1 is empty and g2 holds only a device no variant fits: both succeed at once.
    snapshot, _ = run(rollout(1, 0, 1, 2, skipped=["d2-0"]), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)

    snapshot, actions = run(snapshot, Tick(now=2))

    assert states(snapshot) == [G.SUCCEEDED, G.SUCCEEDED, G.SUCCEEDED, G.RUNNING]
    assert [a.details["total"] for a in actions if isinstance(a, Audit)
            and a.decision is Decision.GROUP_EMPTY] == [0, 0]
    assert [a.device_id for a in deploys(actions)] == ids(3, 2)


def test_a_device_no_variant_fits_is_skipped_and_left_out_of_the_totals() -> None:
    snapshot, actions = run(rollout(3, 1, skipped=["d0-1"]), Start(now=0))

    assert device(snapshot, "d0-1").state is D.SKIPPED
    assert "no variant fits" in device(snapshot, "d0-1").reason
    assert [a.device_id for a in deploys(actions)] == ["d0-0", "d0-2"]
    snapshot = report(snapshot, ["d0-0", "d0-2"], CS.SUCCEEDED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))              # 2 of 2 counted devices: 100%
    assert states(snapshot) == [G.SUCCEEDED, G.RUNNING]


def test_a_rollout_that_can_no_longer_reach_its_success_threshold_fails() -> None:
    cfg = config(success_threshold_percent=75, error_threshold_percent=50)
    snapshot, _ = run(rollout(4, 2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.FAILED, 1)  # at most 2 of 4 can now succeed

    snapshot, actions = run(snapshot, Tick(now=2))

    assert snapshot.state is R.FAILED and snapshot.finished_at == 2
    assert states(snapshot) == [G.FAILED, G.CANCELLED]
    assert {d.state for d in snapshot.groups[1].devices.values()} == {D.CANCELLED}
    assert audit(actions, Decision.SUCCESS_UNREACHABLE).details == {
        "failed": 2, "total": 4, "threshold_percent": 75}


def test_the_rollout_succeeds_once_every_group_passed() -> None:
    snapshot, actions = run(rollout(2, 1), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.SUCCEEDED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))
    snapshot = report(snapshot, ["d1-0"], CS.SUCCEEDED, 3)

    snapshot, actions = run(snapshot, Tick(now=4))

    assert snapshot.state is R.SUCCEEDED and snapshot.finished_at == 4
    assert states(snapshot) == [G.SUCCEEDED, G.SUCCEEDED]
    assert decisions(actions) == [Decision.SUCCESS_THRESHOLD_REACHED, Decision.GROUP_SUCCEEDED,
                                  Decision.ROLLOUT_SUCCEEDED]


def test_the_rollout_succeeds_only_once_no_device_waits_or_is_in_flight() -> None:
    cfg = config(success_threshold_percent=50, max_starts_per_minute=1)
    snapshot, _ = run(rollout(2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)

    snapshot, _ = run(snapshot, Tick(now=2))              # the group passed; d0-1 still waits
    assert states(snapshot) == [G.SUCCEEDED] and snapshot.state is R.RUNNING

    snapshot, actions = run(snapshot, Tick(now=61))
    assert [a.device_id for a in deploys(actions)] == ["d0-1"]
    assert snapshot.state is R.RUNNING                    # d0-1 is in flight

    snapshot = report(snapshot, ["d0-1"], CS.FAILED, 62)  # a final outcome either way
    snapshot, _ = run(snapshot, Tick(now=63))
    assert snapshot.state is R.SUCCEEDED


# --- AWS IoT Jobs' device rules ----------------------------------------------------------------

def test_aws_a_failed_attempt_is_retried_until_attempts_run_out() -> None:
    cfg = config(max_retries=2, error_threshold_percent=100)
    snapshot, first = run(rollout(1, 1, cfg=cfg), Start(now=0))
    sent = deploys(first)
    for now in (1, 3):
        snapshot = report(snapshot, ["d0-0"], CS.FAILED, now)
        assert device(snapshot, "d0-0").state is D.PENDING        # waiting for its retry
        snapshot, actions = run(snapshot, Tick(now=now + 1))
        sent += deploys(actions)

    snapshot = report(snapshot, ["d0-0"], CS.FAILED, 5)

    assert [(a.attempt, a.command_id) for a in sent] == [
        (n, f"r1:d0-0:deploy:{n}") for n in (1, 2, 3)]
    final = device(snapshot, "d0-0")
    assert (final.state, final.attempts, final.finished_at) == (D.FAILED, 3, 5)
    snapshot, actions = run(snapshot, Tick(now=6))
    assert not deploys(actions)


def test_aws_rejected_commands_are_not_retried() -> None:
    snapshot, _ = run(rollout(1, cfg=config(max_retries=3, error_threshold_percent=100)),
                      Start(now=0))

    snapshot = report(snapshot, ["d0-0"], CS.REJECTED, 1)

    assert device(snapshot, "d0-0").state is D.REJECTED
    assert not deploys(run(snapshot, Tick(now=2))[1])


def test_a_device_that_rolled_itself_back_counts_as_a_failed_attempt() -> None:
    snapshot, _ = run(rollout(1, cfg=config(max_retries=1, error_threshold_percent=100)),
                      Start(now=0))

    snapshot, actions = run(snapshot, status(snapshot, "d0-0", CS.ROLLED_BACK, 1, "NaN output"))

    assert device(snapshot, "d0-0").state is D.PENDING
    assert device(snapshot, "d0-0").reason == "attempt 1 rolled-back: NaN output"
    assert audit(actions, Decision.DEVICE_ATTEMPT_FAILED).details["retry"] is True


def test_aws_in_progress_timeout_ends_the_attempt_timed_out() -> None:
    cfg = config(in_progress_timeout_s=100, error_threshold_percent=100)
    snapshot, _ = run(rollout(2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-1"], CS.IN_PROGRESS, 50)  # progress does not extend it

    early, _ = run(snapshot, Tick(now=99.9))
    assert device(early, "d0-0").state is D.IN_PROGRESS

    snapshot, actions = run(snapshot, Tick(now=100))

    assert [device(snapshot, d).state for d in ids(0, 2)] == [D.TIMED_OUT, D.TIMED_OUT]
    assert device(snapshot, "d0-0").finished_at == 100
    timed_out = [a for a in actions if isinstance(a, Audit)
                 and a.decision is Decision.DEVICE_TIMED_OUT]
    assert timed_out[0].details["timeout_s"] == 100 and timed_out[0].details["retry"] is False


def test_aws_a_timed_out_attempt_is_retried_at_once_when_attempts_remain() -> None:
    cfg = config(in_progress_timeout_s=100, max_retries=1)
    snapshot, _ = run(rollout(1, cfg=cfg), Start(now=0))

    snapshot, actions = run(snapshot, Tick(now=100))

    assert [(a.attempt, a.command_id) for a in deploys(actions)] == [(2, "r1:d0-0:deploy:2")]
    assert device(snapshot, "d0-0").started_at == 100
    snapshot, _ = run(snapshot, Tick(now=200))
    assert device(snapshot, "d0-0").state is D.TIMED_OUT


def test_aws_abort_criteria_count_distinct_devices_not_retries() -> None:
    cfg = config(success_threshold_percent=50, error_threshold_percent=100, max_retries=3,
                 abort_failure_percent=50, abort_min_devices=2)
    snapshot, _ = run(rollout(3, cfg=cfg), Start(now=0))
    now = 1.0
    for _ in range(3):                    # three failed attempts of one device: no outcome yet
        snapshot = report(snapshot, ["d0-0"], CS.FAILED, now)
        snapshot, _ = run(snapshot, Tick(now=now + 1))
        now += 2
    assert snapshot.state is R.RUNNING and device(snapshot, "d0-0").attempts == 4

    snapshot = report(snapshot, ["d0-0"], CS.FAILED, now)   # its last attempt: 1 outcome
    snapshot, _ = run(snapshot, Tick(now=now))
    assert snapshot.state is R.RUNNING                       # 1 < abort_min_devices

    snapshot = report(snapshot, ["d0-1"], CS.SUCCEEDED, now)
    snapshot, actions = run(snapshot, Tick(now=now + 1))     # 1 of 2 devices = 50%

    assert snapshot.state is R.ABORTED
    assert audit(actions, Decision.ABORT_CRITERIA_MET).details == {
        "failed_devices": 1, "executed_devices": 2, "failed_percent": 50.0,
        "threshold_percent": 50, "min_devices": 2}
    assert device(snapshot, "d0-2").state is D.IN_PROGRESS   # in flight: left to report


def test_aws_abort_criteria_wait_for_the_minimum_number_of_devices() -> None:
    cfg = config(success_threshold_percent=50, error_threshold_percent=100,
                 abort_failure_percent=10, abort_min_devices=3)
    snapshot, _ = run(rollout(4, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.FAILED, 1)

    snapshot, _ = run(snapshot, Tick(now=2))
    assert snapshot.state is R.RUNNING

    snapshot = report(snapshot, ["d0-2"], CS.SUCCEEDED, 3)
    snapshot, _ = run(snapshot, Tick(now=4))
    assert snapshot.state is R.ABORTED
    assert "2 of 3 devices failed" in snapshot.reason


# --- rate limit --------------------------------------------------------------------------------

def test_rate_limit_starts_at_most_n_devices_in_any_minute() -> None:
    snapshot, actions = run(rollout(8, cfg=config(max_starts_per_minute=3)), Start(now=0))
    assert len(deploys(actions)) == 3
    assert audit(actions, Decision.DEVICES_STARTED).details == {
        "started": 3, "waiting": 8, "limit_per_minute": 3, "started_last_60s": 0}

    for now in (0, 30, 59.9):
        snapshot, actions = run(snapshot, Tick(now=now))
        assert not deploys(actions)

    snapshot, actions = run(snapshot, Tick(now=60))
    assert [a.device_id for a in deploys(actions)] == ids(0, 3, first=3)
    assert snapshot.start_log == (60.0, 60.0, 60.0)


def test_rate_limit_counts_retries_and_serves_earlier_groups_first() -> None:
    cfg = config(max_starts_per_minute=2, max_retries=1, success_threshold_percent=50,
                 error_threshold_percent=100)
    snapshot, _ = run(rollout(2, 3, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)
    snapshot = report(snapshot, ["d0-1"], CS.FAILED, 1)

    snapshot, actions = run(snapshot, Tick(now=60))

    # g0 passed (50%), g1 started; the retry of d0-1 goes first and takes one of the two slots.
    assert [(a.device_id, a.attempt) for a in deploys(actions)] == [("d0-1", 2), ("d1-0", 1)]
