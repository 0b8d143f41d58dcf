"""Run a command's `main(argv)` in the test's own process, as its command line would."""
import importlib

import pytest


def exit_code(main, argv: list[str]) -> int:
    """What `sys.exit(main())` would exit with: main's return value or its SystemExit code."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return 0 if code is None else code


def run_main(capfd: pytest.CaptureFixture, module: str, *argv: str) -> tuple[int, str, str]:
    """`python -m module argv` in this process: (exit code, stdout, stderr), captured at the file
    descriptors (so C libraries' output counts too). An exception that escapes main (a traceback
    for the user) fails the test."""
    main = importlib.import_module(module).main
    capfd.readouterr()
    rc = exit_code(main, list(argv))
    out, err = capfd.readouterr()
    return rc, out, err
