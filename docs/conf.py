"""Sphinx configuration of amaml's documentation site.

Build: ``sphinx-build -n -W --keep-going -b html docs docs/_build/html`` (as CI does, from the repository
root, after ``pip install -e ".[docs]"``). The notebooks are rendered with the outputs stored
in them (nothing is executed).
"""
import inspect
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import amaml  # noqa: E402

# The notebooks live in notebooks/ at the root; the site renders copies of their .ipynb
# files (with the outputs stored in them) from docs/notebooks/, which git ignores.
_NB_SRC = os.path.join(ROOT, "notebooks")
_NB_DST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebooks")
os.makedirs(_NB_DST, exist_ok=True)
for _name in sorted(os.listdir(_NB_SRC)):
  if _name.endswith(".ipynb"):
    with open(os.path.join(_NB_SRC, _name), "rb") as _f:
      _data = _f.read()
    _dst = os.path.join(_NB_DST, _name)
    if os.path.exists(_dst):
      with open(_dst, "rb") as _f:
        if _f.read() == _data:
          continue
    with open(_dst, "wb") as _f:
      _f.write(_data)

project = "amaml"
author = "the amaml developers"
copyright = "the amaml developers"
release = amaml.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
root_doc = "index"

# -- MyST and the notebooks -----------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3  # README/BENCHMARKS links like BENCHMARKS.md#tuning-free-defaults
nb_execution_mode = "off"  # render the outputs stored in notebooks/*.ipynb; never execute
nb_merge_streams = True

# -- autodoc ----------------------------------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# the TFDS path (amaml.data.tfds_omniglot) is documented without the tfds extra installed
autodoc_mock_imports = ["tensorflow_datasets"]
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
# NamedTuple fields are described in each class's "Attributes:" section (rendered as
# attribute entries, so that :attr: references find them); autodoc's "Alias for field
# number N" entries would only repeat them.
napoleon_use_ivar = False

# -- nitpicky (-n) ----------------------------------------------------------------------------
# No intersphinx inventories are fetched (the build runs offline), so the types and functions
# of Python, NumPy, JAX, Flax and Optax that signatures and docstrings name stay unlinked.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|numpy|np|optax|flax|chex|orbax|os|pathlib|collections|typing|"
               r"tensorflow_datasets)(\..*)?"),
    # private helpers that module docstrings name, to tell how a function reads
    (r"py:func", r"_[a-z_]+"),
]

# -- HTML -------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"amaml {release}"
html_static_path = []
html_show_sourcelink = False

# -- README / BENCHMARKS included from the repository root -------------------------------------
# They link to files by their path from the root; on the site those are pages.
LINK_REWRITES = [
    ("](BENCHMARKS.md", "](benchmarks.md"),
    ("](docs/design.md)", "](design.md)"),
    ("](docs/images/", "](images/"),
    ("](README.md", "](index.md"),
]


def _rewrite_links(text: str) -> str:
  for old, new in LINK_REWRITES:
    text = text.replace(old, new)
  return text


def _include_read(app, relative_path, parent_docname, content):
  if str(relative_path).startswith(".."):
    content[0] = _rewrite_links(content[0])


_DATA_DOCS = {}


def _save_data_doc(app, what, name, obj, options, lines):
  """A ``#:`` comment on a module constant is prose; napoleon would read a first line such
  as ``The papers' setting: ...`` as ``type: description``. Keep the text as written."""
  if what == "data":
    _DATA_DOCS[name] = list(lines)


def _restore_data_doc(app, what, name, obj, options, lines):
  if what == "data" and name in _DATA_DOCS:
    saved = _DATA_DOCS.pop(name)
    # a constant with no comment of its own: autodoc falls back to its type's docstring
    type_doc = inspect.getdoc(type(obj)) or ""
    if type_doc and "\n".join(saved).strip() == type_doc.strip():
      saved = []
    lines[:] = saved


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields ("Alias for field number N") are described by their class."""
  doc = getattr(obj, "__doc__", None) or ""
  if what == "class" and re.fullmatch(r"Alias for field number \d+", doc.strip()):
    return True
  return None


def _check_public_api(app, env):
  """Every name in ``amaml.__all__`` is on the API index page."""
  with open(os.path.join(app.srcdir, "api", "index.md"), encoding="utf-8") as f:
    page = f.read()
  missing = [n for n in amaml.__all__ if not re.search(rf"\b{re.escape(n)}\b", page)]
  if missing:
    from sphinx.util import logging
    logging.getLogger(__name__).warning("amaml.__all__ names missing from api/index.md: %s",
                                        ", ".join(missing))


def setup(app):
  app.connect("include-read", _include_read)
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("autodoc-process-docstring", _save_data_doc, priority=100)
  app.connect("autodoc-process-docstring", _restore_data_doc, priority=900)
  app.connect("env-updated", _check_public_api)
  app.connect("missing-reference", _resolve_reexport)


def _real_name(name):
  """``amaml.alpha_maml`` -> ``amaml.meta.alpha_maml``; ``amaml.MetaLearner.step`` ->
  ``amaml.meta.MetaLearner.step``; ``None`` when ``name`` is not an amaml object."""
  import importlib
  import types
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
      break
    except ImportError:
      continue
  else:
    return None
  real, rest = obj.__name__, parts[i:]
  for k, attr in enumerate(rest):
    obj = getattr(obj, attr, None)
    if obj is None:
      return None
    if isinstance(obj, types.ModuleType):
      real = obj.__name__
    elif getattr(obj, "__module__", None) and getattr(obj, "__qualname__", None):
      real = f"{obj.__module__}.{obj.__qualname__}"
    else:  # a field or constant: keep its name under the resolved parent
      return ".".join([real] + rest[k:])
  return real


def _resolve_reexport(app, env, node, contnode):
  """Resolves names re-exported by a package (``amaml.alpha_maml``, or ``alpha_maml`` in
  the ``amaml`` module's docstring) to the entry in the module that defines the object
  (``amaml.meta.alpha_maml``)."""
  if node.get("refdomain") != "py":
    return None
  target = node.get("reftarget", "").lstrip("~.")
  candidates = [target]
  if node.get("py:class"):
    candidates.append(f"{node.get('py:module')}.{node['py:class']}.{target}")
  if node.get("py:module"):
    candidates.append(f"{node['py:module']}.{target}")
  domain = env.get_domain("py")
  for name in candidates:
    if not name.startswith("amaml"):
      continue
    real = _real_name(name)
    if real is None or real == name:
      continue
    for typ in (node.get("reftype"), "obj"):
      found = domain.resolve_xref(env, node["refdoc"], app.builder, typ, real, node, contnode)
      if found is not None:
        return found
  # ``MetaLearner.step`` named from a module that does not import MetaLearner: the one
  # amaml object whose name ends so
  ends = [k for k in domain.objects if k.startswith("amaml.") and k.endswith("." + target)]
  if len(ends) == 1:
    return domain.resolve_xref(env, node["refdoc"], app.builder, node.get("reftype"), ends[0],
                               node, contnode)
  return None
