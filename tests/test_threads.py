"""unfog.threads: the thread count for a generation follows what other processes use, and
never overrides a count the user chose."""

import pytest
import torch

from unfog import threads


@pytest.fixture
def fake_machine(monkeypatch):
    """Two cores; `clock` advances wall time, other processes' and our own CPU seconds."""
    start = torch.get_num_threads()
    clock = {"busy": 0.0, "mine": 0.0, "wall": 0.0}
    monkeypatch.setattr(threads, "_cpu_times", lambda: (clock["busy"], clock["mine"], clock["wall"]))
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("UNFOG_THREADS", raising=False)
    monkeypatch.setitem(threads._state, "initial", 2)
    monkeypatch.setitem(threads._state, "last_set", None)
    torch.set_num_threads(2)
    threads._state["sample"] = threads._cpu_times()

    def advance(seconds, others, mine):
        clock["wall"] += seconds
        clock["busy"] += (others + mine) * seconds
        clock["mine"] += mine * seconds

    yield advance
    torch.set_num_threads(start)


def test_one_thread_fewer_per_core_others_keep_busy(fake_machine):
    fake_machine(1.0, others=1.0, mine=2.0)  # another process on one core while we ran on both
    assert threads.fit_threads() == 1 and torch.get_num_threads() == 1
    fake_machine(1.0, others=0.0, mine=1.0)  # it has gone
    assert threads.fit_threads() == 2 and torch.get_num_threads() == 2
    fake_machine(1.0, others=0.3, mine=1.0)  # a little background work does not cost a thread
    assert threads.fit_threads() == 2


def test_the_users_choice_is_left_alone(fake_machine, monkeypatch):
    torch.set_num_threads(1)  # the user's own call, before any generation
    fake_machine(1.0, others=0.0, mine=0.0)
    assert threads.fit_threads() == 1
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    fake_machine(1.0, others=2.0, mine=0.0)
    assert threads.fit_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("UNFOG_THREADS", "fixed")
    assert threads.fit_threads() == 2


def test_a_compiled_unet_keeps_its_thread_count(fake_machine, tiny_model_dir):
    """A generation fits the thread count to the machine's load, except with a torch.compile'd
    U-Net, where a new count would recompile it (tens of seconds per shape)."""
    from unfog import Pipeline

    pipe = Pipeline.from_pretrained(tiny_model_dir)
    fake_machine(1.0, others=1.0, mine=0.0)  # another process keeps one core busy
    pipe("a red circle", num_inference_steps=2, seed=0)
    assert torch.get_num_threads() == 1
    fake_machine(1.0, others=0.0, mine=0.0)
    pipe.unet._compiled_call_impl = pipe.unet._call_impl  # as nn.Module.compile() marks it, without compiling
    pipe("a red circle", num_inference_steps=2, seed=0)
    assert torch.get_num_threads() == 1
    pipe.unet._compiled_call_impl = None
    pipe("a red circle", num_inference_steps=2, seed=0)
    assert torch.get_num_threads() == 2
