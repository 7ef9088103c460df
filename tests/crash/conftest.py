"""Print one summary line per crash-tested operation at the end of the run."""


def pytest_terminal_summary(terminalreporter):
    from tests.crash.harness import RECOVERY_LINES, RESULTS
    if not RESULTS and not RECOVERY_LINES:
        return
    terminalreporter.section("crash points exercised")
    for outcome in RESULTS.values():
        terminalreporter.write_line(outcome.line())
    for line in RECOVERY_LINES:
        terminalreporter.write_line(line)
