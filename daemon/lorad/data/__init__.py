"""The data side of LoRA training: finding images and captions, bucketing, and caching latents.

Modules, each named for what it holds:

- :mod:`lorad.data.dataset` — ``scan_dataset`` (find, verify and caption every image once, before
  training starts) and ``load_image_for_bucket`` (pixels for one training sample).
- :mod:`lorad.data.captions` — the metadata CSV, ``<stem>.txt`` sidecar files, and
  ``prepare_caption`` (kohya-style keep_tokens / shuffle / dropout / trigger word).
- :mod:`lorad.data.buckets` — aspect-ratio buckets and the deterministic per-epoch batch plan.
- :mod:`lorad.data.latent_cache` — VAE latents cached in memory and on disk.
- :mod:`lorad.data.cache_entries` — the files both caches (latents, text-encoder outputs) keep.
- :mod:`lorad.data.report` — ``DataReport``: what the scan found, used and skipped, and why.

Importing this package (or ``report``, ``captions``, ``buckets``, ``dataset``) does not import
torch; only ``latent_cache`` and the pixel loader need it, so a data check stays fast.
"""
