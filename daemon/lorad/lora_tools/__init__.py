"""The LoRA toolbox: what happens to a LoRA file after training.

One module per operation: :mod:`.inspect` (what a file is and what is wrong with it), :mod:`.resize`
(SVD to a lower or dynamic rank), :mod:`.merge` (several LoRAs into one), :mod:`.convert` (between the
kohya, diffusers, PEFT and ComfyUI layouts), :mod:`.bake` (into a single-file checkpoint) and
:mod:`.extract` (a LoRA from the difference of two checkpoints). They share :mod:`.lora_file` (the
in-memory LoRA every layout reads into), :mod:`.layouts` (detecting and reading/writing each layout),
:mod:`.base_families` (which base model a file was made for), :mod:`.sd_key_map` (SD 1.x/2.x module
names in each layout), :mod:`.low_rank` (the SVD arithmetic) and :mod:`.tensor_files` (reading and
writing checkpoints one tensor at a time, so memory stays bounded).
"""
