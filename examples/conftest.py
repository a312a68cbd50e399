# In your project this line goes in the root conftest.py: the seed and simulator fixtures
# and the `statistical` marker of intercascade's testing kit (pip install 'intercascade[testing]').
pytest_plugins = ["intercascade_core.testing.pytest_plugin"]
