import pytest

from tests.support.otlp import OtlpReceiver
from tests.support.prereq import require_ebpf


@pytest.fixture(autouse=True)
def _ebpf_prerequisites():
    require_ebpf()


@pytest.fixture
def otlp_receiver():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()
