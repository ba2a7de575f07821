"""SMs the served pass leaves to nvJPEG (``serve --decoder-sms``, continual_mem.sm_partition): the policy, that every
pass runs inside the batcher's partition, and on a GPU the same bits on fewer SMs (graphs captured there)."""
import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("fastapi")

from serving import ServeSettings  # noqa: E402
from serving_helpers import client, on_gpu, png, predict  # noqa: E402
from registry_helpers import two_task_registry  # noqa: E402


def test_the_server_holds_sms_back_only_when_its_pass_decodes_on_a_gpu():
    def held(sm_count=132, **kw):
        return ServeSettings(registry="x.db", **kw).held_sms(sm_count)

    assert held(device="cuda") == 0  # not shown to help serving: asked for, not assumed
    assert held(device="cpu", sm_count=0) == 0
    assert held(device="cuda", decoder_sms=8) == 8
    assert held(device="cuda", jpeg_decode="host", decoder_sms=4) == 4  # asked for: given
    with pytest.raises(ValueError, match="must be 0 or in 1..131"):
        held(device="cuda", decoder_sms=132)
    with pytest.raises(ValueError, match="runs on the CPU; pass 0"):
        held(device="cpu", sm_count=0, decoder_sms=4)
    with pytest.raises(ValueError, match="decoder_sms must be >= 0"):
        ServeSettings(registry="x.db", decoder_sms=-1)


def test_every_pass_runs_on_the_batcher_s_partition(tmp_path, monkeypatch):
    """The engine gives the batcher the settings' answer, and each pass, all-task or routed, runs inside
    :func:`~continual_mem.sm_partition.partition` with it (on the CPU it holds nothing back)."""
    import serving.batcher as batcher_module
    import serving.engine as engine_module
    from continual_mem.sm_partition import partition as real

    reg, _ = two_task_registry(tmp_path)
    inside, seen = [], []

    @contextlib.contextmanager
    def recording(device, reserve, *, required=True):
        seen.append((reserve, required))
        inside.append(True)
        try:
            with real(device, reserve, required=required) as held:
                yield held
        finally:
            inside.pop()

    from continual_mem import MemoryViT

    for name in ("forward", "forward_routed"):
        def inside_only(model, *args, _real=getattr(MemoryViT, name), **kwargs):
            assert inside, "a model pass ran outside the batcher's partition"
            return _real(model, *args, **kwargs)

        monkeypatch.setattr(MemoryViT, name, inside_only)
    monkeypatch.setattr(batcher_module, "partition", recording)
    monkeypatch.setattr(engine_module, "sm_count", lambda device: 132)
    with client(reg, decoder_sms=4) as c:
        assert c.app.state.batcher.decoder_sms == 4
        assert predict(c, png(1)).status_code == 200
        assert predict(c, png(2), tasks="b").status_code == 200
    assert seen and set(seen) == {(4, True)}  # asked for: an error where it cannot be held


@on_gpu
def test_a_pass_on_fewer_sms_gives_the_same_bits(tmp_path):
    """JPEGs decoded by nvJPEG beside a pass (and graphs captured) on all SMs but 8: every answer, all-task and
    routed, equals the whole device's bit for bit."""
    from serving.batcher import Batcher
    from serving.holder import ModelHolder
    from serving.metrics import Metrics
    from test_device_decode import jpeg

    reg, _ = two_task_registry(tmp_path)
    holder = ModelHolder(ServeSettings(registry=reg.url, device="cuda", poll_interval_s=0))
    uploads = [jpeg(i, (500 + 40 * i, 375)) for i in range(5)]
    asked = [("a",), ("b",), ("a", "b"), None, ("b",)]
    got = {}
    for reserve in (0, 8):
        served = holder.current = holder.load()  # a model of its own: its graphs are captured on these SMs
        b = Batcher(holder, Metrics(), max_batch=8, max_wait_ms=1, amp=True, device_decode=True,
                    decoder_sms=reserve)
        b.warm(served)
        got[reserve] = [b._forward(served, uploads), b._forward(served, uploads, asked=[(t or ("a", "b")) for t in
                                                                                        asked])]
    for whole, held in zip(got[0], got[8]):
        for w, h in zip(whole, held):
            assert w.keys() == h.keys() and all(np.array_equal(w[t], h[t]) for t in w)
