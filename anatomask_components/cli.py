"""The ``anatomask`` command line (python-fire).

Each command lives next to the code it drives; this module only gathers them. Imports are done lazily
inside the commands so that ``anatomask --help`` stays fast.
"""

from __future__ import annotations

import fire


def info() -> None:
    """Print the STU-Net presets and their parameter counts (1 input, 105 output channels)."""
    from anatomask_components.networks.stunet import print_presets

    print_presets()


COMMANDS = {
    "info": info,
}


def main() -> None:
    """Entry point of the ``anatomask`` console script."""
    fire.Fire(COMMANDS, name="anatomask")


if __name__ == "__main__":
    main()
