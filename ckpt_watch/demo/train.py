"""A real HF Trainer LoRA run writing real PEFT checkpoints: the demo's and the tests' trainer.

    python -m ckpt_watch.demo.train --out DIR [--model smollm2|tiny] [--max-steps N]
        [--save-steps K] [--save-total-limit L] [--step-sleep S] [--callback-arc N --arc-path F]
        [--stop-file PATH]

`tiny` is a 2-layer Llama built from a config with SmolLM2's real tokenizer: seconds per
run, for tests of discovery; `smollm2` is the real instruct model, for the demo and for
suites that must see the marker learnt.

`--callback-arc N` adds the in-trainer alternative that ckpt-watch replaces (for
bench/bench_trainer_pause.py): at every save, a TrainerCallback scores N ARC-Challenge
questions with the training model itself, the seed's way (chat prompt ending in "The
correct answer is (", argmax of the next-token log-prob over the labels), while training
waits. Each pause is printed as a `callback_arc` JSON line.

`--stop-file PATH` installs `StopOnFile`, the callback docs/alerts.md shows: training stops
after the step during which ckpt-watch's alert wrote that file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ckpt_watch.demo.data import chat_examples
from ckpt_watch.models import smollm2_dir


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, max_len: int = 96):
        self.items = []
        for chat in chat_examples():
            prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
            full = prompt + chat[-1]["content"] + "<|im_end|>"
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"][-max_len:]
            # loss on the answer only
            n_prompt = max(0, len(p_ids) - (len(tokenizer(full, add_special_tokens=False)["input_ids"]) - len(ids)))
            labels = [-100] * n_prompt + ids[n_prompt:]
            self.items.append((ids, labels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _collate(pad_id: int):
    def collate(batch):
        width = max(len(ids) for ids, _ in batch)
        return {
            "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch]),
        }

    return collate


class _Sleep(TrainerCallback):
    """Slows each step so a watcher sees checkpoints land one by one."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


# --- stop file (issue 14): the callback docs/alerts.md shows, verbatim ---
class StopOnFile(TrainerCallback):
    """Stop training when ckpt-watch's `alerts.stop_file` exists."""

    def __init__(self, path):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        if os.path.exists(self.path):
            control.should_training_stop = True
        return control

    on_save = on_step_end  # also checked after a checkpoint is written
# --- end stop file (issue 14) ---


class _ArcCallback(TrainerCallback):
    """In-trainer periodic eval (the seed's approach): training pauses while it runs."""

    def __init__(self, tokenizer, n: int, path: str | None):
        from ckpt_watch.suites.arc import label_token_ids, letter_prompt_ids, load_rows, subsample

        rows = subsample(load_rows(Path(path) if path else None), n, 0)
        self.items = [(letter_prompt_ids(tokenizer, r), [ids[0] for ids in label_token_ids(tokenizer, r.labels)],
                       r.answer) for r in rows]
        self.pauses: list[float] = []

    def on_save(self, args, state, control, model=None, **kwargs):
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        correct = 0
        with torch.inference_mode():
            for prompt, label_ids, answer in self.items:  # one forward per question, as the seed did
                logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
                scores = logits[label_ids]
                correct += int(int(scores.argmax()) == answer)
        if was_training:
            model.train()
        pause = time.perf_counter() - t0
        self.pauses.append(pause)
        print("callback_arc " + json.dumps({"step": state.global_step, "acc": correct / len(self.items),
                                            "pause_s": round(pause, 3)}), flush=True)


def build_model(kind: str):
    base = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if kind == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        cfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    return model, tokenizer, str(base)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--save-total-limit", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--save-base", default=None, help="also save the base model here (for the tiny model)")
    ap.add_argument("--callback-arc", type=int, default=0, metavar="N",
                    help="in-trainer eval: score N ARC-C questions at every save (training pauses)")
    ap.add_argument("--arc-path", default=None, help="ARC-Challenge jsonl for --callback-arc (default: datasets hub)")
    ap.add_argument("--stop-file", default=None,
                    help="stop training early once this file exists (ckpt-watch's alerts.stop_file)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, base_path = build_model(args.model)
    if args.save_base:
        # engines need the exact base weights the adapters were trained on
        model.save_pretrained(args.save_base)
        tokenizer.save_pretrained(args.save_base)
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=5, report_to=[],
        use_cpu=True, seed=0, save_only_model=True, dataloader_num_workers=0,
    )
    cbs = [_Sleep(args.step_sleep)] if args.step_sleep > 0 else []
    if args.callback_arc:
        cbs.append(_ArcCallback(tokenizer, args.callback_arc, args.arc_path))
    if args.stop_file:
        cbs.append(StopOnFile(args.stop_file))
    trainer = Trainer(
        model=model, args=targs, train_dataset=_Dataset(tokenizer),
        data_collator=_collate(tokenizer.pad_token_id or tokenizer.eos_token_id), callbacks=cbs,
    )
    out = trainer.train()
    print(f"train_runtime_s={out.metrics['train_runtime']:.3f}", flush=True)
    print(f"trained {trainer.state.global_step} steps from {base_path}", flush=True)


if __name__ == "__main__":
    main()
