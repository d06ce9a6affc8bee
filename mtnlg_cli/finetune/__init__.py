"""Supervised fine-tuning (`mtnlg finetune`): examples in four JSONL formats (examples.py), rendered in the model's
chat format with the loss on the assistant's tokens (render.py), packed into rows (rows.py), trained in full or
with LoRA adapters (lora.py) by the trainer's loop (trainer.py), and adapters exported for PEFT (peft_export.py)."""
