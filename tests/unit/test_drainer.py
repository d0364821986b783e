"""The drain loop's pace and the kernel's span budget (pure functions of the agent's parts)."""
from otel_ebpf.attacher import span_interval_ns
from otel_ebpf.drainer import IDLE_DRAIN_S, QUIET_RECORDS, next_drain_wait


def test_drain_wait_backs_off_while_idle_and_snaps_back_on_records():
    wait, waits = 0.02, []
    for _ in range(6):
        wait = next_drain_wait(0, wait, 0.02)
        waits.append(wait)
    assert waits == [0.04, 0.08, IDLE_DRAIN_S, IDLE_DRAIN_S, IDLE_DRAIN_S, IDLE_DRAIN_S]
    assert next_drain_wait(QUIET_RECORDS, wait, 0.02) == 0.02


def test_a_trickle_of_records_is_drained_at_the_quiet_pace():
    wait = 0.02
    for _ in range(4):
        wait = next_drain_wait(3, wait, 0.02)
    assert wait == IDLE_DRAIN_S


def test_a_configured_interval_longer_than_the_idle_cap_is_kept():
    assert next_drain_wait(0, 0.5, 0.5) == 0.5


def test_span_budget_interval():
    assert span_interval_ns(1000) == 1_000_000
    assert span_interval_ns(3) == 333_333_333
    assert span_interval_ns(0) == 0
