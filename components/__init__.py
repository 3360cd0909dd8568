"""arborl's components: stages over artifact URIs and what they are built from.

Importing the package registers the config's registry-backed checks (config/choices.py): the advantage
estimators and the reward functions check their own names.
"""

from arborl.components.advantages import registry as _estimators  # noqa: F401 - registers its config checks
from arborl.components.verification import rewards as _rewards  # noqa: F401 - registers its config checks
