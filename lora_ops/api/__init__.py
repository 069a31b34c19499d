"""OpenAI's fine-tuning API over the pipeline (``lora-ops api``).

* :mod:`~lora_ops.api.keys`: who calls; :mod:`~lora_ops.api.files`: uploads, checked,
  in S3; :mod:`~lora_ops.api.jobs`: jobs as runs of ``retrain/<customer>``, in OpenAI's
  statuses; :mod:`~lora_ops.api.hyperparameters`: OpenAI's names to a TrainConfig;
  :mod:`~lora_ops.api.progress`: events and checkpoints; :mod:`~lora_ops.api.runs`: what
  jobs need of the orchestrator (``flows.jobs`` implements it with Prefect);
  :mod:`~lora_ops.api.views`: OpenAI's object shapes; :mod:`~lora_ops.api.routes`,
  :mod:`~lora_ops.api.errors`, :mod:`~lora_ops.api.app`: the HTTP side.
"""
