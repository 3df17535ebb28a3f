"""Every DeepSpeed private member that training/ds_compat.py reads or replaces still exists in the installed
DeepSpeed. When this fails after a DeepSpeed upgrade, re-check the patch named in the message against the new
release, then update the patch, ``CHECKED_VERSIONS`` and this test together."""
from __future__ import annotations

import importlib
import inspect
import re
import warnings

import pytest

deepspeed = pytest.importorskip("deepspeed")

from megatron_mtp.training import ds_compat  # noqa: E402


def _has_instance_attribute(cls, name: str) -> bool:
    """Assigned (``<something>.<name> =``) in the source of the class or one of its bases."""
    for klass in cls.__mro__:
        try:
            if re.search(rf"\.{name}\s*=[^=]", inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


@pytest.mark.parametrize("module, cls, member", ds_compat.PATCHED_MEMBERS,
                         ids=[".".join(x for x in entry if x) for entry in ds_compat.PATCHED_MEMBERS])
def test_patched_member_exists(module, cls, member):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"deepspeed {deepspeed.__version__} has no module {module} ({exc}); ds_compat was checked "
                    f"against {ds_compat.CHECKED_VERSIONS}: re-check the patch that uses it.")
    owner = getattr(mod, cls, None) if cls else mod
    assert owner is not None, f"deepspeed {deepspeed.__version__} has no {module}.{cls}; re-check ds_compat."
    if member is None:
        return
    found = hasattr(owner, member) or (member in ds_compat.INSTANCE_MEMBERS and _has_instance_attribute(owner, member))
    assert found, (f"deepspeed {deepspeed.__version__} no longer has {module}.{cls + '.' if cls else ''}{member}, "
                   f"which training/ds_compat.py patches (checked against {ds_compat.CHECKED_VERSIONS}); update "
                   f"the patch for this release.")


def test_checked_versions_named():
    if deepspeed.__version__ not in ds_compat.CHECKED_VERSIONS:
        warnings.warn(f"deepspeed {deepspeed.__version__} is not among the versions ds_compat was checked against "
                      f"({ds_compat.CHECKED_VERSIONS}); the member checks above passed, but re-read the patches.")
    assert all(v.count(".") == 2 for v in ds_compat.CHECKED_VERSIONS)
