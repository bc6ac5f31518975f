"""Root conftest: the notebooks (collected by nbmake) run on the fast `test` profile in a throwaway run
directory, in file order, each in a fresh kernel, passing state only through that directory."""
import os
import tempfile

os.environ.setdefault("QLORA_PROFILE", "test")
os.environ.setdefault("QLORA_RUN_DIR", tempfile.mkdtemp(prefix="qlora-nbmake-"))
os.environ.setdefault("MPLBACKEND", "Agg")
