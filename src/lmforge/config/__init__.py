"""Config system: Jinja-preprocessed YAML templates with inheritance that build lazy object graphs.

Public API: `load_config(config, project_dir=None, sets=())` returns a `Config`, whose
`construct(target, **variables)` builds fresh objects; `find_project(start)` returns the
nearest directory with meta.yaml. The template language is described in docs/templates.md.
"""

from lmforge.config.config import Config, load_config
from lmforge.config.project import Project, find_project, load_project

__all__ = ["Config", "Project", "find_project", "load_config", "load_project"]
