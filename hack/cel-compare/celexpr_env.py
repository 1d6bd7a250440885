"""Shared helper: a cel-expr-python Env with every standard extension the wheel ships."""
from cel_expr_python import cel

ALL_EXT_YAML = """
name: celcmp
extensions:
  - name: strings
  - name: optional
  - name: lists
  - name: sets
  - name: regex
  - name: math
  - name: bindings
  - name: encoders
  - name: cel.lib.ext.comprev2
"""

def new_env(variables=None, container=None, functions=None):
    kw = {}
    if container:
        kw["container"] = container
    if functions:
        kw["functions"] = functions
    return cel.NewEnv(config=cel.NewEnvConfigFromYaml(ALL_EXT_YAML), variables=variables or {}, **kw)
