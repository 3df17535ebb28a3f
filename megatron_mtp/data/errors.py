"""The one exception type the data pipeline raises for problems a user can fix.

It subclasses ``ValueError`` so callers that already catch bad-value errors keep working, and its
message is always one sentence naming the file or setting to fix.
"""

from megatron_mtp.errors import DataError  # noqa: F401  (defined with the other user errors)
