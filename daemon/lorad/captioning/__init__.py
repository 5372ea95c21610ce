"""Captioning: captioners that write the captions a folder is missing, for training and on request.

Three kinds behind one interface (:class:`~lorad.captioning.captioner.Captioner`): ``blip``
(sentences from an image-to-text model), ``wd14`` (booru tags from a WD14 ONNX tagger) and ``clip``
(phrases of a vocabulary ranked by CLIP). Models are local folders (or cached Hugging Face ids) and
are checked before loading (:mod:`~lorad.captioning.model_folder`). Images are batched by size
(:mod:`~lorad.captioning.runner`); captions go into metadata.csv or sidecars
(:mod:`~lorad.captioning.writer`), and generated ones are recorded so people's captions are never
overwritten by accident (:mod:`~lorad.captioning.record`). :func:`~lorad.captioning.folder.caption_folder`
serves ``lorad caption`` and the daemon's CaptionService; :mod:`~lorad.captioning.training` gives a
training run its ``caption_missing`` hook.

Importing this package imports nothing heavy; torch, transformers and onnxruntime are imported when a
captioner loads.
"""
