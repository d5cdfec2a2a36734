"""The two kinds of failure the CLI reports in one line.

`UsageError` (exit 2): the input is wrong (recipe, data, model directory, CLI arguments).
`RunError` (exit 1): the input was fine but the work failed at run time (a rank died, a disk
filled up, an engine did not start).

Library code raises these with a message that names the file, key or line and says what was
expected; `dipnet` prints `error: <message>` and exits, with no traceback unless `--debug`.
"""


class DipnetError(Exception):
    exit_code = 1


class UsageError(DipnetError):
    exit_code = 2


class RunError(DipnetError):
    exit_code = 1
