"""The "LoRA Training" tab, built with the gradio 3.41 API that AUTOMATIC1111 ships.

``build_ui(host)`` returns a ``gr.Blocks``; A1111 mounts it as a tab, the standalone page launches
it. Handlers live in ``lorad_webui.actions``; this module only lays out components and wires them.
Elements carry ``lorad-*`` ids so browser tests (and users' CSS) can find them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from lorad_webui import TAB_TITLE, actions
from lorad_webui.form import LENGTH_UNITS, TrainForm

# AUTOMATIC1111 adds the extension's style.css to its page itself; the standalone page gets it from here.
STYLE = Path(__file__).resolve().parent.parent / "style.css"


def build_ui(host: actions.Host) -> gr.Blocks:
    """The tab's Blocks for ``host`` (call inside no other Blocks context)."""
    with gr.Blocks(analytics_enabled=False, title=TAB_TITLE, css=STYLE.read_text()) as blocks:
        status = gr.Markdown(actions.connection_status(host), elem_id="lorad-status")
        check = gr.Button("Check connection", elem_id="lorad-check")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### 1. Images")
                folder = gr.Textbox(label="Image folder (on this machine)", elem_id="lorad-folder")
                upload = gr.File(
                    label="…or upload images", file_count="multiple", file_types=["image"], elem_id="lorad-upload"
                )
                with gr.Row():
                    captioner = gr.Dropdown(
                        list(actions.CAPTIONERS),
                        value=next(iter(actions.CAPTIONERS)),
                        label="Captioner",
                        elem_id="lorad-captioner",
                    )
                    captioner_model = gr.Textbox(
                        label="Captioner model (folder; empty = its usual one)", elem_id="lorad-captioner-model"
                    )
                overwrite = gr.Checkbox(label="Replace existing captions", value=False)
                with gr.Row():
                    caption_button = gr.Button("Caption images", elem_id="lorad-caption")
                    reload_button = gr.Button("Reload captions", elem_id="lorad-reload")
                    save_button = gr.Button("Save caption edits", elem_id="lorad-save-captions")
                caption_log = gr.Textbox(
                    label="Captioning", lines=3, max_lines=8, interactive=False, elem_id="lorad-caption-log"
                )
                table = gr.Dataframe(
                    headers=["image", "caption"],
                    datatype=["str", "str"],
                    col_count=(2, "fixed"),
                    type="array",
                    interactive=True,
                    label="Captions (edit, then save)",
                    elem_id="lorad-captions",
                )
            with gr.Column():
                gr.Markdown("### 2. Train")
                checkpoints = list(host.checkpoints())
                with gr.Row():
                    base_choice = gr.Dropdown(
                        checkpoints,
                        value=checkpoints[0] if checkpoints else None,
                        label="Base model",
                        elem_id="lorad-base-choice",
                    )
                    refresh_models = gr.Button("Refresh list", size="sm", elem_id="lorad-refresh-models")
                base_path = gr.Textbox(
                    label="…or base model path (file or diffusers folder)", elem_id="lorad-base-path"
                )
                with gr.Row():
                    name = gr.Textbox(label="LoRA name", elem_id="lorad-name")
                    trigger = gr.Textbox(label="Trigger word", elem_id="lorad-trigger")
                with gr.Row():
                    rank = gr.Number(value=8, precision=0, label="Rank", elem_id="lorad-rank")
                    unit = gr.Radio(list(LENGTH_UNITS), value="steps", label="Train for", elem_id="lorad-unit")
                    length = gr.Number(value=500, precision=0, label="Steps / epochs", elem_id="lorad-length")
                with gr.Accordion("More settings", open=False):
                    resolution = gr.Number(
                        value=None,
                        precision=0,
                        label="Resolution (blank: the model's own, 512 for SD 1.5, 1024 for SDXL)",
                        elem_id="lorad-resolution",
                    )
                    learning_rate = gr.Number(value=1e-4, label="Learning rate", elem_id="lorad-lr")
                    sample_prompts = gr.Textbox(
                        label="Sample prompts (one a line; kohya's --w --h --d --s --l --n options; [trigger])",
                        lines=2,
                        elem_id="lorad-sample-prompts",
                    )
                    sample_every = gr.Number(
                        value=0,
                        precision=0,
                        label="Sample every N steps (0: before and after training)",
                        elem_id="lorad-sample-every",
                    )
                    extra = gr.Textbox(
                        label="Extra config keys (YAML, one `key: value` per line)", lines=3, elem_id="lorad-extra"
                    )
                with gr.Row():
                    train_button = gr.Button("Train", variant="primary", elem_id="lorad-train")
                    cancel_button = gr.Button("Cancel", elem_id="lorad-cancel")
                job_id = gr.Textbox(label="Job", interactive=False, elem_id="lorad-job")
                progress = gr.Textbox(label="Progress", lines=8, interactive=False, elem_id="lorad-progress")
                snippet = gr.Textbox(label="Use it in a prompt", interactive=False, elem_id="lorad-snippet")
                with gr.Row():
                    sample_button = gr.Button("Sample now", elem_id="lorad-sample-now")
                    save_now_button = gr.Button("Save now", elem_id="lorad-save-now")
                gallery = gr.Gallery(label="Samples (newest first)", columns=4, height="auto", elem_id="lorad-samples")
                gr.Markdown("### 3. Inspect a LoRA")
                with gr.Row():
                    inspect_path = gr.Textbox(
                        label="LoRA file (path, or a name in the LoRA folder; empty = the job's LoRA)",
                        elem_id="lorad-inspect-path",
                    )
                    inspect_button = gr.Button("Inspect", size="sm", elem_id="lorad-inspect")
                inspect_report = gr.Textbox(
                    label="Base model, rank and alpha per block, metadata, problems",
                    lines=12,
                    max_lines=40,
                    interactive=False,
                    elem_id="lorad-inspect-report",
                )

        def on_upload(files: Any) -> tuple[Any, ...]:
            if not files:
                return gr.update(), gr.update(), gr.update()
            folder_path = str(actions.save_uploads(files if isinstance(files, list) else [files], host.work_dir()))
            rows, message = actions.caption_table(folder_path)
            return folder_path, rows, message

        def on_caption(folder_value: str, *args: Any) -> Any:
            yield from ((text, gr.update()) for text in actions.caption_images(host, folder_value, *args))
            rows, _ = actions.caption_table(folder_value)
            yield gr.update(), rows

        def on_reload(folder_value: str) -> tuple[Any, str]:
            rows, message = actions.caption_table(folder_value)
            return rows, message

        def on_train(
            folder_value: str,
            choice: str,
            path: str,
            name_value: str,
            trigger_value: str,
            rank_value: Any,
            unit_value: str,
            length_value: Any,
            resolution_value: Any,
            lr_value: Any,
            prompts_value: str,
            every_value: Any,
            extra_value: str,
        ) -> Any:
            form = TrainForm(
                name=name_value or "",
                data_dir=folder_value or "",
                base_model=actions.base_model_path(host, choice, path or ""),
                trigger_word=trigger_value or "",
                rank=_number(rank_value),
                length_unit=unit_value,
                length=_number(length_value),
                resolution=_number(resolution_value),
                learning_rate=_number(lr_value),
                extra=extra_value or "",
                sample_prompts=prompts_value or "",
                sample_every=_number(every_value),
            )
            yield from actions.train(host, form)

        def on_inspect(path: str, job: str) -> str:
            return actions.inspect_lora(host, path or "", job or "")

        def on_refresh_models() -> Any:
            choices = list(host.checkpoints())
            return gr.update(choices=choices, value=choices[0] if choices else None)

        check.click(lambda: actions.connection_status(host), outputs=status, queue=False)
        upload.upload(on_upload, inputs=upload, outputs=[folder, table, caption_log])
        caption_button.click(
            on_caption, inputs=[folder, captioner, captioner_model, trigger, overwrite], outputs=[caption_log, table]
        )
        reload_button.click(on_reload, inputs=folder, outputs=[table, caption_log], queue=False)
        folder.submit(on_reload, inputs=folder, outputs=[table, caption_log], queue=False)
        save_button.click(actions.save_caption_edits, inputs=[folder, table], outputs=caption_log, queue=False)
        refresh_models.click(on_refresh_models, outputs=base_choice, queue=False)
        train_button.click(
            on_train,
            inputs=[
                folder,
                base_choice,
                base_path,
                name,
                trigger,
                rank,
                unit,
                length,
                resolution,
                learning_rate,
                sample_prompts,
                sample_every,
                extra,
            ],
            outputs=[progress, snippet, job_id, gallery],
        )
        # Not queued either: they wait for the running step, beside the queued training generator.
        sample_button.click(
            lambda job: actions.ask_running(host, job, "sample"), inputs=job_id, outputs=status, queue=False
        )
        save_now_button.click(
            lambda job: actions.ask_running(host, job, "save"), inputs=job_id, outputs=status, queue=False
        )
        # Not queued: it must answer while a training job holds the queue's worker.
        for trigger in (inspect_button.click, inspect_path.submit):
            trigger(on_inspect, inputs=[inspect_path, job_id], outputs=inspect_report, queue=False)
        # Not queued: the queue's worker is busy following the training job this cancels.
        cancel_button.click(lambda job: actions.cancel(host, job), inputs=job_id, outputs=status, queue=False)
    return blocks


def _number(value: Any) -> Any:
    """gradio Numbers arrive as floats (or None); whole numbers become ints so the form checks them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
