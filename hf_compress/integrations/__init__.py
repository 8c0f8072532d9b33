"""Every use of another library's private internals lives in this folder, each checked on a named version.

- `transformers`: the load guard around ``from_pretrained`` (transformers 5.23/5.24).
- `peft`, `peft_layers`: LoRA on our quantized and low-rank layers through plain ``get_peft_model`` (peft 0.21.2).
- `trainer`: the Trainer's private checkpoint hooks used by distillation (transformers 5.23/5.24, torch 2.13).
"""
