"""python -m autoglm_fast.train --out DIR: train the nano checkpoint from scratch (see recipe.py)."""
import argparse
import dataclasses

from .recipe import Recipe, train_nano


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m autoglm_fast.train", description=__doc__)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    for f in dataclasses.fields(Recipe):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):  # --freeze-vision-tower / --no-freeze-vision-tower
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    train_nano(out, Recipe(**args))


if __name__ == "__main__":
    main()
