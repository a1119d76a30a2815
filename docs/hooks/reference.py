"""The generated reference: an MkDocs hook (mkdocs.yml `hooks:`) that writes the reference pages
from the code each time the site is built, so that they cannot drift from it:

- reference/spec.md: every key of the sweep spec, from its pydantic models (reference_spec);
- reference/methods.md: the combination types, from the method registry (reference_methods);
- reference/cli.md: every command's help and options, from the `raymerge` command
  (reference_cli).

The pages exist only in the build (`File.generated`): nothing generated is written into docs/.
MkDocs puts this folder on sys.path while it loads the hook, so its siblings import by name.
"""

from __future__ import annotations

from reference_cli import cli_page
from reference_methods import methods_page
from reference_spec import spec_page

PAGES = {
    "reference/spec.md": spec_page,
    "reference/methods.md": methods_page,
    "reference/cli.md": cli_page,
}
"""Each generated page and the function that writes it (called with the code's defaults)."""


def on_files(files, config):
    """Add the generated pages to the build (replacing any file of the same name)."""
    from mkdocs.structure.files import File

    for uri, page in PAGES.items():
        old = files.get_file_from_path(uri)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, uri, content=page()))
    return files
