# Fixtures and factories live in data_factories.py: a test module importing from
# "conftest" would get whichever conftest another test directory put on sys.path first.
from data_factories import *  # noqa: F401,F403
