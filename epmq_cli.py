"""The ``epmq`` command's entry point, outside the epmq package: importing epmq (torch,
transformers, Triton: seconds) is the first thing it does, and Ctrl-C then ended the command in
a traceback of torch's imports, which no code of the package runs early enough to catch."""

import sys


def main(argv=None) -> int:
    try:
        from epmq.cli import main as epmq_main
    except KeyboardInterrupt:
        print("\nepmq: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    return epmq_main(argv)


if __name__ == "__main__":
    sys.exit(main())
