"""LoRA recovery with peft: the pruned base stays frozen, so its sparsity is untouched.

```yaml
recover:
  method: lora
  data: squad                 # or wikitext2, gsm8k, {mix: {wikitext2: 0.5, squad: 0.5}}
  lora: {r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj], merge: false}
  train: {samples: 1000, epochs: 1, seqlen: 512, batch_size: 4, grad_accum: 4, lr: 2.0e-4}
```
`targets` takes module names or the groups `attention` (q/k/v/o), `mlp` (gate/up/down) and `all`.
The adapter is stored in peft's format and evaluation uses it unmerged. `merge: true` folds it into
the weights — which fills pruned weights back in; the stage then reports the resulting density.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sparselab.matrix import Recover
from sparselab.models import LoadedModel, load_model, save_model
from sparselab.recover.base import RecoverContext, RecoveryMethod

GROUPS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
GROUPS["all"] = GROUPS["attention"] + GROUPS["mlp"]


def resolve_targets(targets: list[str]) -> list[str]:
    names: list[str] = []
    for target in targets:
        for name in GROUPS.get(target, [target]):
            if name not in names:
                names.append(name)
    return names


class LoraRecovery(RecoveryMethod):
    def check(self, config: Recover, linear_names: set[str] | None = None) -> None:
        if not linear_names:
            return
        unknown = [t for t in resolve_targets(config.lora.targets) if t not in linear_names]
        if unknown:
            raise ValueError(f"LoRA target(s) {', '.join(unknown)} are not linear modules of this "
                             f"model; valid: {', '.join(sorted(linear_names))}, or the groups "
                             "attention, mlp, all.")

    def memory(self, config: Recover, m):
        from sparselab.footprint import saved_per_token, training_need
        shapes = m.shape.linears()
        targets = [t for t in resolve_targets(config.lora.targets) if t in shapes]
        trainable = m.shape.layers * sum(config.lora.r * sum(shapes[t]) for t in targets)
        dropped = {t: shapes[t][1] for t in targets} if config.lora.dropout > 0 else {}
        return training_need(m, config.train, trainable,
                             saved_per_token(m, config.train.precision, dropped, full=False))

    def recover(self, loaded: LoadedModel, ctx: RecoverContext) -> tuple[LoadedModel, dict]:
        import torch
        from peft import LoraConfig, get_peft_model
        lora = ctx.config.lora
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=resolve_targets(lora.targets), task_type="CAUSAL_LM")
        # The adapter's initial weights come from torch's global generator: seed it here, or
        # they depend on whatever ran earlier in this process (a Ray worker differs from a loop).
        torch.manual_seed(ctx.config.train.seed)
        model = get_peft_model(loaded.model, config)
        from sparselab.recover.training import train  # transformers: only when training
        metrics = train(model, loaded.tokenizer, ctx)
        if lora.merge:
            model = model.merge_and_unload()
            ctx.log.warning("LoRA merged into the weights: pruned weights are filled back in; "
                            "sparsity.linear reports the merged model's real density")
        model.eval()
        return LoadedModel(model, loaded.tokenizer), metrics

    def save(self, loaded: LoadedModel, folder: Path) -> None:
        if hasattr(loaded.model, "peft_config"):
            loaded.model.save_pretrained(folder / "adapter")
            loaded.tokenizer.save_pretrained(folder / "adapter")
        else:
            save_model(loaded, folder / "model")

    def load(self, parent: Callable[[], LoadedModel], folder: Path, dtype: str) -> LoadedModel:
        if (folder / "model").is_dir():
            return load_model(folder / "model", dtype=dtype)
        from peft import PeftModel
        base = parent()
        model = PeftModel.from_pretrained(base.model, folder / "adapter")
        model.eval()
        return LoadedModel(model, base.tokenizer)
