import os

# keep tests from reading a user's data folder: the packaged data and ../shared are found
# through the default search order
os.environ.pop("HASHRET_DATA", None)


def pytest_configure(config):
    # numba's pedantic SSA notice on the scan's inlined overloads (see hashret/index/kernels.py,
    # which hides it outside pytest too); pytest resets a module's own warning filters per test
    from hashret.index.scans import INLINED_NOTICE

    config.addinivalue_line(
        "filterwarnings", f"ignore:{INLINED_NOTICE}:numba.core.errors.NumbaIRAssumptionWarning")

# the suite tests the kernels: a search compiles them in the call (and a subprocess the suite
# starts inherits this), where a user's first search would run on numpy while they compile behind
os.environ["HASHRET_COMPILE"] = "foreground"
