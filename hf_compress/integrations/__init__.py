"""Every use of another library's private internals lives in this folder, each checked on a named version.

- `transformers`: the load guard around ``from_pretrained`` (transformers 5.23/5.24).
- `peft`, `peft_layers`: LoRA on our quantized and low-rank layers through plain ``get_peft_model`` (peft 0.21.2).
- `trainer`: the Trainer's private checkpoint hooks, and FSDP under ``accelerate launch`` on CPU and with
  compressed models (transformers 5.23/5.24, accelerate 1.15, torch 2.13).
"""
