"""The pieces of the Ray Train job that need no cluster: sharding, checkpoints, resumable loops."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ad.config import AutoencoderConfig, UNetConfig, load_settings
from edge_ad.d3ad.detector import D3AD
from edge_ad.d3ad.trainer import LoopControl, train_autoencoder, train_unet
from edge_ad.models import build_autoencoder, build_unet, make_noise_scheduler
from pipelines.checkpoint import Resume, read_checkpoint, write_checkpoint
from pipelines.train import shard_indices


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4)])
def test_shards_are_equal_sized_and_cover_everything(n: int, world: int) -> None:
    shards = [shard_indices(n, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same step count on every worker
    assert len(shards[0]) == -(-n // world)
    assert set(np.concatenate(shards)) == set(range(n))
    if n % world == 0:  # no padding needed: a partition
        assert sorted(np.concatenate(shards)) == list(range(n))


def test_shard_rank_outside_world_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        shard_indices(10, 2, 2)


def _latents(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_unet_loop_resumed_mid_run_ends_where_an_unbroken_run_ends() -> None:
    torch.manual_seed(0)
    start = build_unet(16, 4, (32, 64), attention=False)
    cfg = UNetConfig(epochs=4, batch_size=4, lr=1e-3, ema_decay=0.9)
    sched = make_noise_scheduler()
    cpu = torch.device("cpu")

    straight = copy.deepcopy(start)
    train_unet(straight, _latents(), sched, cfg, cpu)

    saved: dict[int, tuple[dict, dict]] = {}
    first = copy.deepcopy(start)

    def keep(epoch: int, state: dict) -> None:
        saved[epoch] = (_weights(first), copy.deepcopy(state))

    train_unet(first, _latents(), sched, cfg, cpu, control=LoopControl(on_epoch_end=keep))
    assert sorted(saved) == [0, 1, 2, 3]
    # "Crash" after epoch 1: a fresh model gets the epoch-1 weights and loop state.
    weights, state = saved[1]
    resumed = copy.deepcopy(start)
    resumed.load_state_dict(weights)
    train_unet(resumed, _latents(), sched, cfg, cpu, control=LoopControl(resume=state))
    for key, value in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=0, atol=1e-6)


def test_autoencoder_loop_resumes_with_its_cosine_schedule() -> None:
    torch.manual_seed(0)
    start = build_autoencoder((16, 16), 1)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    cfg = AutoencoderConfig(
        block_out_channels=(16, 16), epochs=3, batch_size=2, crop_size=None, lr_schedule="cosine"
    )
    cpu = torch.device("cpu")
    straight = copy.deepcopy(start)
    summary = train_autoencoder(straight, images, cfg, cpu)

    saved: dict[int, tuple[dict, dict]] = {}
    first = copy.deepcopy(start)

    def keep(epoch: int, state: dict) -> None:
        saved[epoch] = (_weights(first), copy.deepcopy(state))

    train_autoencoder(first, images, cfg, cpu, control=LoopControl(on_epoch_end=keep))
    weights, state = saved[0]
    resumed = copy.deepcopy(start)
    resumed.load_state_dict(weights)
    again = train_autoencoder(resumed, images, cfg, cpu, control=LoopControl(resume=state))
    assert again["ae_lr"] == pytest.approx(summary["ae_lr"])
    for key, value in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=0, atol=1e-5)


def test_checkpoint_round_trip_restores_weights_and_progress(tmp_path: Path) -> None:
    settings = load_settings("tiny")
    torch.manual_seed(0)
    source = D3AD.build(settings)
    source.codec.scaling_factor = 0.7
    loop = {"epoch": 3, "optimizer": {"state": {}, "param_groups": []}, "generators": []}
    write_checkpoint(tmp_path, source, "unet", 3, 8, loop)

    torch.manual_seed(1)
    target = D3AD.build(settings)
    assert not torch.equal(
        next(target.unet.parameters()), next(source.unet.parameters())
    )  # really different before loading
    resume = read_checkpoint(tmp_path, target)
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert target.codec.scaling_factor == pytest.approx(0.7)
    assert resume == Resume("unet", 3, 8, loop)
    assert resume.finished("autoencoder") and not resume.finished("unet")
    assert resume.loop_state("unet") == loop and resume.loop_state("head") is None


def test_resume_after_the_last_epoch_of_a_stage_moves_on() -> None:
    done_unet = Resume("unet", 7, 8, loop={"epoch": 7})
    assert done_unet.finished("unet") and not done_unet.finished("head")
    assert done_unet.loop_state("unet") is None  # nothing left to continue
    assert Resume("done", 0, 1, None).finished("head")
