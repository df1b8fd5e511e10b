"""Weight-space ensembling of a policy with the checkpoint it started from (WiSE-FT, Wortsman et al. 2022).

Writes a copy of policy checkpoint POLICY whose backbone weights are `alpha * policy + (1 - alpha) * start`, START being
the DeepSeek-VL2 folder its vla stage began from (the rows the vla stage added to the vocabulary, and the action head,
stay the policy's). alpha 1 is the policy, 0 the starting language model under the policy's head. Score the copies on
validation seeds with `vla_sweep.py NAME --policy OUT`:

    python docs/experiments/wise_ft.py outputs/sweep/runs/base/policy checkpoints/dsvl2-mini 0.8 outputs/wise-0.8
"""

from __future__ import annotations

import argparse


def interpolate(policy_dir: str, start_dir: str, alpha: float, out: str) -> dict[str, int]:
    import torch

    from backbone.deepseek_vl2 import load_deepseek_vl2
    from vla.commands import mini
    from vla.policy import VLAPolicy

    policy = VLAPolicy.load(policy_dir)
    start = load_deepseek_vl2(mini.resolve(start_dir)).state_dict()
    counts = {"mixed": 0, "rows": 0, "kept": 0}  # whole tensors, vocabulary-grown ones (first rows), the policy's own
    with torch.no_grad():
        for name, tensor in policy.backbone.state_dict().items():
            base = start.get(name)
            if base is None or base.ndim == 0 or not tensor.is_floating_point() or base.shape[1:] != tensor.shape[1:] \
                    or base.shape[0] > tensor.shape[0]:
                counts["kept"] += 1
                continue
            target = tensor[: base.shape[0]]
            target.copy_(alpha * target + (1 - alpha) * base.to(target.dtype))
            counts["rows" if base.shape[0] < tensor.shape[0] else "mixed"] += 1
    policy.save(out, extra={"wise_ft": {"policy": str(policy_dir), "start": str(start_dir), "alpha": alpha}})
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("policy")
    parser.add_argument("start")
    parser.add_argument("alpha", type=float)
    parser.add_argument("out")
    args = parser.parse_args()
    print(interpolate(args.policy, args.start, args.alpha, args.out))


if __name__ == "__main__":
    main()
