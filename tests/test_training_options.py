"""Data and loss options (issue 18), each shown by its effect: flip_aug, random_crop, masked_loss,
regularization images, clip_skip, the noise and timestep options, caption options and the EMA."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.data.buckets import plan_flips
from lorad.data.captions import prepare_caption
from lorad.diffusion.clip_skip import clip_hidden_states, final_layer_norm
from lorad.diffusion.latents import view_pixels
from lorad.diffusion.noise import input_perturbation, multires_noise
from lorad.errors import ConfigError
from lorad.events import ignore_events
from lorad.training.checkpoints import list_checkpoints, load_checkpoint
from lorad.training.family import RunHooks
from lorad.training.loop import train
from lorad.training.placement import pick_placement
from tests.support.datasets import draw_image, make_dataset, tiny_train_values


def config_for(tmp_path: Path, tiny_sd: Path, data: Path, out: str = "out", **overrides: object):
    values = tiny_train_values(tiny_sd, data, tmp_path / out, cache_dir=tmp_path / "cache", **overrides)
    if not (data / "metadata.csv").exists():
        values.pop("metadata_path")
    return parse_config(values, base_dir=tmp_path)


@contextmanager
def sd_run(config) -> Iterator:
    """A started SD run (its adapter attached) on a freshly loaded tiny model; the model is restored after."""
    from lorad.families.sd.family import FAMILY, load_for_training

    placement = pick_placement("cpu", "no")
    components = load_for_training(str(config.base_model), placement)
    data = FAMILY.scan(config, on_event=ignore_events, hooks=RunHooks())
    torch.manual_seed(0)
    run = FAMILY.start(config, components, data, placement, ignore_events)
    try:
        yield run
    finally:
        FAMILY.restore(components)


def vae_mean(run, image, bucket, view: str) -> torch.Tensor:
    with torch.no_grad():
        return run.components.vae.encode(view_pixels(image, bucket, view)[None]).latent_dist.mean[0]


# --- flip_aug -------------------------------------------------------------------------------------
def test_flip_aug_caches_both_orientations_and_the_plan_mirrors_each_image_once(
    tmp_path: Path, tiny_sd: Path, dataset: Path
) -> None:
    config = config_for(tmp_path, tiny_sd, dataset, flip_aug=True, batch_size=2)
    with sd_run(config) as run:
        images = run.data.images
        cached = [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".safetensors"]
        assert len(cached) == 2 * len(images)  # both orientations of every image, on disk
        for image, bucket in zip(images, run.data.buckets, strict=True):
            plain = run.latents[(image.content_hash, bucket)][0]
            mirrored = run.latents[(image.content_hash + ":hflip", bucket)][0]
            assert torch.allclose(mirrored, vae_mean(run, image, bucket, "hflip"), atol=1e-5)
            assert not torch.allclose(mirrored, plain)

        plan = run.plan(0)
        drawn = [i for mb in plan for i in mb.samples]
        assert sorted(drawn) == list(range(len(run.samples)))  # each image once in the epoch
        planned = plan_flips(len(run.samples), seed=config.seed, epoch=0)
        assert [f for mb in plan for f in mb.flips] == [planned[i] for i in drawn]
        assert True in planned and False in planned
        assert planned != plan_flips(len(run.samples), seed=config.seed, epoch=1)  # another epoch, other choices

        # The micro-batch's latents are drawn from the planned orientation's posterior.
        micro = plan[0]
        got = run.clean_latents(micro, torch.Generator().manual_seed(7)).latents
        keys = [
            (run.images[run.samples[i]].content_hash + (":hflip" if f else ""), run.sample_buckets[i])
            for i, f in zip(micro.samples, micro.flips, strict=True)
        ]
        mean = torch.stack([run.latents[k][0] for k in keys])
        std = torch.stack([run.latents[k][1] for k in keys])
        want = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))) * 0.18215
        assert torch.allclose(got, want)


# --- random_crop ----------------------------------------------------------------------------------
def test_random_crop_takes_latent_windows_at_varying_offsets(tmp_path: Path, tiny_sd: Path) -> None:
    data = tmp_path / "wide"
    data.mkdir()
    for i in range(2):
        draw_image(data / f"w{i}.png", "red", "circle", size=(96, 64), seed=i)
        (data / f"w{i}.txt").write_text("a red circle")
    config = config_for(tmp_path, tiny_sd, data, random_crop=True, enable_bucket=False, batch_size=1)
    with sd_run(config) as run:
        image, bucket = run.images[0], run.buckets[0]
        whole = run.latents[(image.content_hash + ":cover", bucket)][0]
        assert whole.shape[-2:] == (8, 12)  # the whole 96x64 image, not the 64x64 centre
        offsets = set()
        micro = next(mb for mb in run.plan(0) if run.samples[mb.samples[0]] == 0)
        for seed in range(12):
            generator = torch.Generator().manual_seed(seed)
            crop = run.clean_latents(micro, generator).latents[0] / 0.18215
            # The window is a crop of the cached whole: find its offset by the mean (std noise is small).
            errors = [(crop - whole[:, :, x : x + 8]).abs().mean() for x in range(5)]
            offsets.add(int(torch.stack(errors).argmin()))
        assert len(offsets) > 1


# --- masked_loss ----------------------------------------------------------------------------------
def half_transparent_dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(2):
        draw_image(root / f"m{i}.png", "blue", "square", seed=i)
        rgba = Image.open(root / f"m{i}.png").convert("RGBA")
        alpha = Image.new("L", rgba.size, 255)
        alpha.paste(0, (0, 0, 32, 64))  # the left half is transparent: not trained
        rgba.putalpha(alpha)
        rgba.save(root / f"m{i}.png")
        (root / f"m{i}.txt").write_text("a blue square")
    return root


@pytest.mark.parametrize("source", ["alpha", "mask_dir"])
def test_a_pixel_masked_to_zero_contributes_zero_gradient(tmp_path: Path, tiny_sd: Path, source: str) -> None:
    data = half_transparent_dataset(tmp_path / "masked")
    extra: dict[str, object] = {}
    if source == "mask_dir":
        masks = tmp_path / "masks"
        masks.mkdir()
        for i in range(2):  # the same mask as a greyscale file; the images themselves made opaque
            Image.open(data / f"m{i}.png").getchannel("A").save(masks / f"m{i}.png")
            Image.open(data / f"m{i}.png").convert("RGB").save(data / f"m{i}.png")
        extra["mask_dir"] = masks
    config = config_for(tmp_path, tiny_sd, data, masked_loss=True, batch_size=2, **extra)
    with sd_run(config) as run:
        captured: dict[str, torch.Tensor] = {}

        def keep_output(module, args, output):
            output.sample.retain_grad()
            captured["pred"] = output.sample

        handle = run.components.unet.register_forward_hook(keep_output)
        loss = run.loss(run.plan(0)[0], torch.Generator().manual_seed(0))
        loss.backward()
        handle.remove()
        grad = captured["pred"].grad
        assert torch.count_nonzero(grad[..., :4]) == 0  # latent columns of the transparent half: no gradient
        assert torch.count_nonzero(grad[..., 4:]) == grad[..., 4:].numel()


# --- regularization images ------------------------------------------------------------------------
def test_reg_images_are_balanced_and_their_loss_weighted(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    reg = tmp_path / "reg" / "1_dog"
    make_dataset(reg, count=3, csv=False)
    for sidecar in reg.glob("*.txt"):
        sidecar.unlink()  # uncaptioned: the folder's class word is their caption
    config = config_for(tmp_path, tiny_sd, dataset, reg_data_dir=tmp_path / "reg", prior_loss_weight=0.3)
    with sd_run(config) as run:
        train_count = len(run.data.images)
        reg_samples = [i for i in run.samples if i >= train_count]
        assert len(run.samples) - len(reg_samples) == len(reg_samples) == 8  # as many reg as training samples
        assert sorted({run.samples.count(i) for i in set(reg_samples)}) == [2, 3]  # 8 = 3 + 3 + 2, kohya's cycle
        assert {run.images[i].caption for i in reg_samples} == {"dog"}

        micro = next(mb for mb in run.plan(0) if {run.samples[i] >= train_count for i in mb.samples} == {True, False})
        per_sample = run.sample_losses(micro, torch.Generator().manual_seed(3))
        total = run.loss(micro, torch.Generator().manual_seed(3))
        is_reg = torch.tensor([run.samples[i] >= train_count for i in micro.samples])
        want = (per_sample[~is_reg].sum() + 0.3 * per_sample[is_reg].sum()) / len(micro.samples)
        assert torch.allclose(total, want)


# --- clip_skip ------------------------------------------------------------------------------------
def test_clip_skip_conditions_on_the_expected_layer(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    config = config_for(tmp_path, tiny_sd, dataset, clip_skip=2)
    with sd_run(config) as run:
        te, tokenizer = run.components.text_encoder, run.components.tokenizer
        ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            out = te(ids, output_hidden_states=True)
            penultimate = final_layer_norm(te)(out.hidden_states[-2])
            used = run.traits.encode(run.components, ["a red circle"], run.device, run.config)["hidden"]
        assert torch.allclose(used, penultimate)
        assert not torch.allclose(used, out.last_hidden_state)
        with torch.no_grad():
            assert torch.equal(clip_hidden_states(te, ids, 1), out.last_hidden_state)
    with pytest.raises(ConfigError), sd_run(config_for(tmp_path, tiny_sd, dataset, clip_skip=5)):
        pass  # the tiny text encoder has 2 layers


# --- noise and timesteps --------------------------------------------------------------------------
def test_timestep_range_and_input_perturbation_reach_the_unet(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    config = config_for(tmp_path, tiny_sd, dataset, min_timestep=200, max_timestep=210, batch_size=4)
    seen: list[torch.Tensor] = []
    with sd_run(config) as run:
        handle = run.components.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
        for seed, micro in enumerate(run.plan(0)):
            run.loss(micro, torch.Generator().manual_seed(seed))
        handle.remove()
    drawn = torch.cat(seen)
    assert drawn.min() >= 200 and drawn.max() < 210 and len(set(drawn.tolist())) > 1


def test_input_perturbation_changes_only_the_model_input() -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    perturbed = input_perturbation(noise, gamma=0.1, generator=torch.Generator().manual_seed(1))
    extra = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(perturbed, noise + 0.1 * extra)
    assert input_perturbation(noise, gamma=0.0, generator=torch.Generator()) is noise


def test_multires_noise_adds_low_frequencies_at_unit_std() -> None:
    white = torch.randn(16, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    pyramid = multires_noise(white, iterations=6, discount=0.8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(16), atol=1e-5)

    def neighbour_correlation(x: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])

    # Neighbouring latent pixels become correlated: the coarse levels are smooth.
    assert neighbour_correlation(white) < 0.02 and neighbour_correlation(pyramid) > 0.3
    assert multires_noise(white, iterations=0, discount=0.4, generator=torch.Generator()) is white


# --- captions -------------------------------------------------------------------------------------
def test_tag_dropout_drops_only_unkept_tags_at_its_rate() -> None:
    caption = "ohwx, " + ", ".join(f"tag{i}" for i in range(200))
    out = prepare_caption(
        caption, rng=random.Random(0), shuffle=False, keep_tokens=1, dropout=0.0, trigger_word=None, tag_dropout=0.25
    )
    tags = out.split(", ")
    assert tags[0] == "ohwx"
    assert 120 < len(tags) - 1 < 180  # about 150 of 200 kept
    assert tags[1:] == sorted(tags[1:], key=lambda t: int(t[3:]))  # order kept without shuffle


def test_keep_tokens_separator_keeps_the_head_in_place() -> None:
    caption = "ohwx, 1girl ||| red hair, smile, outdoors, hat ||| masterpiece"
    for seed in range(5):
        out = prepare_caption(
            caption,
            rng=random.Random(seed),
            shuffle=True,
            keep_tokens=0,
            dropout=0.0,
            trigger_word=None,
            keep_tokens_separator="|||",
        )
        tags = out.split(", ")
        assert tags[:2] == ["ohwx", "1girl"] and tags[-1] == "masterpiece" and "|||" not in out
        assert sorted(tags[2:-1]) == ["hat", "outdoors", "red hair", "smile"]


def test_an_option_name_typo_gets_a_did_you_mean(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config_for(tmp_path, tiny_sd, dataset, flip_augment=True, multires_noise_iteration=6, network_dropout=0.1)
    fixes = {p.key: p.fix for p in err.value.problems}
    assert "`flip_aug`" in fixes["flip_augment"]
    assert "`multires_noise_iterations`" in fixes["multires_noise_iteration"]
    assert "lora_dropout" in fixes["network_dropout"]


# --- EMA ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ema_export_equals_the_ema_of_the_recorded_trajectory(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    decay = 0.6
    config = config_for(
        tmp_path,
        tiny_sd,
        dataset,
        ema_decay=decay,
        max_train_steps=5,
        save_steps=1,
        keep_checkpoints=10,
        save_precision="fp32",
        learning_rate="5e-2",
    )
    result = train(config)
    # The trajectory: the weights after steps 1-4 (checkpoints) and 5 (the trained export).
    trajectory = [load_checkpoint(p).lora["unet"] for p in list_checkpoints(config.output_dir)]
    assert len(trajectory) == 4
    final = load_file(result.outputs["kohya"])
    ema = {k: v.clone() for k, v in trajectory[0].items()}
    for state in trajectory[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * state[k] for k in ema}
    from lorad.lora.kohya_format import to_kohya

    last_raw = {}
    for key in ema:
        module, _, role = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        last_raw[key] = final[f"{name}.{'lora_down' if role == 'A.weight' else 'lora_up'}.weight"]
    ema = {k: decay * ema[k] + (1 - decay) * last_raw[k] for k in ema}
    exported = load_file(result.outputs["kohya_ema"])
    for key, value in to_kohya({"unet": ema}, 4.0, torch.float32).items():
        assert torch.allclose(exported[key], value, atol=1e-6), key
    assert any(not torch.equal(exported[k], final[k]) for k in final)
    assert Path(result.outputs["diffusers_ema"]).is_file()

    instead = train(
        config_for(
            tmp_path,
            tiny_sd,
            dataset,
            "instead",
            ema_decay=decay,
            ema_export="instead",
            max_train_steps=5,
            save_precision="fp32",
            learning_rate="5e-2",
        )
    )
    assert "kohya_ema" not in instead.outputs
    assert all(torch.equal(load_file(instead.outputs["kohya"])[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_every_option_together_trains(tmp_path: Path, tiny_sd: Path) -> None:
    data = half_transparent_dataset(tmp_path / "masked")
    draw_image(data / "wide.png", "red", "circle", size=(96, 64))
    (data / "wide.txt").write_text("ohwx ||| a red circle, simple background")
    make_dataset(tmp_path / "reg" / "2_shape", count=2, csv=False)
    config = config_for(
        tmp_path,
        tiny_sd,
        data,
        network_type="loha",
        conv_dim=2,
        rank_dropout=0.1,
        module_dropout=0.1,
        flip_aug=True,
        random_crop=True,
        masked_loss=True,
        reg_data_dir=tmp_path / "reg",
        prior_loss_weight=0.5,
        clip_skip=2,
        multires_noise_iterations=4,
        ip_noise_gamma=0.1,
        min_timestep=100,
        max_timestep=900,
        caption_tag_dropout_rate=0.2,
        keep_tokens_separator="|||",
        shuffle_caption=True,
        ema_decay=0.9,
        optimizer="prodigy",
        learning_rate=1.0,
        train_text_encoder=True,
        epochs=2,
    )
    result = train(config)
    assert {"kohya", "kohya_ema"} <= result.outputs.keys()
    from safetensors import safe_open

    with safe_open(result.outputs["kohya"], "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_clip_skip"] == "2" and meta["ss_flip_aug"] == "True" and "Prodigy" in meta["ss_optimizer"]
