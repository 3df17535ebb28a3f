"""``mtp-generate``: the command line of tools/generate.py, whose logic has not moved into this package yet.

It loads that file from the source checkout the package was installed from (``pip install -e .``).
"""
import importlib.util
import os
import sys

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                     "generate.py")


def main(argv=None) -> int:
    if not os.path.isfile(_TOOL):
        print(f"error: {_TOOL} is missing: mtp-generate needs the source checkout (pip install -e .)",
              file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("megatron_mtp_tool_generate", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
