"""``nsdd-train``: the workstation pipeline (simulate → solve → prior → teacher → distill → evaluate), and
``refine-psf`` (the PSF warp that explains real captures), ``design-mask`` (a mask for a new camera, whose PSF then feeds ``simulate``)."""

from __future__ import annotations

import sys

from nsdd_edge.cli_common import run_dispatcher

COMMANDS = {
    "simulate": "train.simulate",
    "solve": "train.solve",
    "evaluate": "train.evaluate",
    "robustness": "train.robustness",
    "prior": "train.prior.train_prior",
    "teacher": "train.teacher",
    "teacher-progress": "train.teacher_progress",
    "distill": "train.distill_cli",
    "fit": "train.fit",
    "refine-psf": "train.refine_psf",
    "design-mask": "train.mask.cli",
}


def main(argv=None) -> int:
    return run_dispatcher("nsdd-train", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
