"""Re-planning sweep: success of one trained policy checkpoint per `n_action_steps` and with ACT temporal ensembling.

Reproduces the measurements behind the demo's `policy: {n_action_steps: 8}` (docs/experiments.md, 2026-11-29):
  - the `n_action_steps` sweep on validation seeds 5000+ (200 episodes per robot) that chose 8, the whole chunk:
        python docs/experiments/replan_sweep.py --checkpoint DIR --n-action-steps 2 4 6 8
  - the earlier sweep on the test seeds 1000+ (50 episodes per robot), which is why the choice moved to validation seeds:
        python docs/experiments/replan_sweep.py --checkpoint DIR --seed 1000 --episodes 50 --n-action-steps 1 2 4 6 8
  - ACT temporal ensembling against the whole chunk:
        python docs/experiments/replan_sweep.py --checkpoint DIR --n-action-steps 8 --temporal-ensemble 0.01
    (the coefficient of the recorded run was not written down; 0.01 is ACT's default).
The numbers in docs/experiments.md were measured on demo policies of earlier configs that were not kept; run
`vla demo` (outputs/demo/policy) for the current one, or `vla demo` at the commit named there for an earlier one.

Everything else is what the demo's rollouts used when these were measured (vla/commands/demo.py, evaluate_policies):
the robots' one-object scenes (`env_kwargs: {num_objects: [1, 1]}`; the demo's scenes now hold 2-3 objects:
`--num-objects 2 3`), 64-px frames, 10 parallel envs, episode k on env seed `seed + k`. With
`--n-action-steps 8` (or the value saved in the checkpoint) and the defaults this is the same rollout as
`vla eval policy=checkpoint:DIR 'env=[vla/PointNav-v0,vla/ArmReach-v0]' episodes=200 seed=5000 image_size=64
batch_size=10 'env_kwargs={num_objects: [1, 1]}'`; `vla eval` cannot change the checkpoint's re-planning settings,
which is why this script exists.

Prints one table (setting x robot success) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", required=True, help="policy checkpoint folder (e.g. outputs/demo/policy)")
    parser.add_argument("--n-action-steps", type=int, nargs="*", default=[2, 4, 6, 8],
                        help="actions served from each predicted chunk before re-planning (default: 2 4 6 8)")
    parser.add_argument("--temporal-ensemble", type=float, nargs="*", default=[],
                        help="ACT temporal-ensembling coefficients to add to the sweep (re-plans every step)")
    parser.add_argument("--env", nargs="+", default=["vla/PointNav-v0", "vla/ArmReach-v0"])
    parser.add_argument("--episodes", type=int, default=200, help="episodes per env and setting (default 200)")
    parser.add_argument("--seed", type=int, default=5000, help="first env seed (validation: 5000; the demo's test: 1000)")
    parser.add_argument("--num-objects", type=int, nargs=2, default=[1, 1], help="objects per robot scene (default: the 2026-11-29 measurements' 1 1; the demo's now: 2 3)")
    parser.add_argument("--image-size", type=int, default=64, help="camera size (the demo's: 64)")
    parser.add_argument("--batch-size", type=int, default=10, help="parallel envs (the demo's eval_batch: 10)")
    parser.add_argument("--train-datasets", nargs="*", default=[],
                        help="the policy's training datasets (the demo's: outputs/demo/data/nav outputs/demo/data/arm): "
                             "eval seeds they were collected from are refused, as in `vla eval train_datasets=`")
    parser.add_argument("--out", default=None, help="write summary.json per setting and env under this folder")
    args = parser.parse_args(argv)
    if not args.n_action_steps and not args.temporal_ensemble:
        parser.error("nothing to run: give --n-action-steps and/or --temporal-ensemble")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import envs  # noqa: F401  registers the built-in envs
    from envs.rollout import evaluate
    from vla.policy.env_policy import EnvPolicy
    from vla.policy import VLAPolicy

    policy = VLAPolicy.load(args.checkpoint)
    saved = (policy.config.n_action_steps, policy.config.temporal_ensemble_coeff)
    settings = [(f"n_action_steps={k}", k, None) for k in args.n_action_steps]
    settings += [(f"temporal_ensemble={c:g}", None, c) for c in args.temporal_ensemble]
    kwargs = {"num_objects": list(args.num_objects)}

    def factory(_argument, context):
        return EnvPolicy(policy, context.embodiment.name)

    rows, results, start = [], {}, time.time()
    for label, steps, coeff in settings:
        policy.config.n_action_steps, policy.config.temporal_ensemble_coeff = steps, coeff
        results[label] = {}
        for env_id in args.env:
            policy.reset()
            out = os.path.join(args.out, label, env_id.replace("/", "_")) if args.out else None
            summary = evaluate(factory, [env_id], episodes=args.episodes, batch_size=args.batch_size, out=out,
                               videos=0, seed=args.seed, image_size=args.image_size, env_kwargs={env_id: kwargs},
                               progress=False, train_datasets=args.train_datasets)
            rate = summary["overall"]["success_rate"]
            results[label][env_id] = rate
            print(f"{label:<24} {env_id:<18} {rate:.2f}", flush=True)
        rows.append([label] + [f"{results[label][e]:.2f}" for e in args.env])

    print(f"\ncheckpoint {args.checkpoint} (saved: n_action_steps={saved[0]}, temporal_ensemble_coeff={saved[1]}); "
          f"{args.episodes} episodes per env, seeds {args.seed}+, {args.num_objects[0]}-{args.num_objects[1]} objects\n")
    header = ["setting"] + args.env
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(json.dumps({"checkpoint": args.checkpoint, "episodes": args.episodes, "seed": args.seed,
                      "success": results, "wall_s": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
