"""The virtual tree: which names exist, what they are, and their attributes.

Layout, one view (one module here) per top folder::

    /studies/<Study>/metadata.json                        studies.py
    /studies/<Study>/<Series>/metadata.json
    /studies/<Study>/<Series>/<Instance>.dcm
    /patients/<Patient>/<Study>/<Series>/<Number>.dcm     patients.py, names for people
    /dates/<YYYY>/<YYYY-MM>/<YYYY-MM-DD>/<Study>/...      dates.py, the same by date
    /query/<QIDO query>/<Study>/<Series>/<Instance>.dcm   query.py, like /studies
    /rendered/<Study>/<Series>/<Instance>.png|.jpg        rendered.py
    /upload/...                                           dicomfs.upload, opt-in

:class:`Tree` (root.py) turns paths into nodes (nodes.py) through the view that
made each folder (view.py); views read the server through the
:class:`~dicomfs.tree.catalog.Catalog` (the archive), never its store or client.
"""

from dicomfs.tree.nodes import Kind, Node
from dicomfs.tree.root import Tree
from dicomfs.tree.view import Entries

__all__ = ["Entries", "Kind", "Node", "Tree"]
