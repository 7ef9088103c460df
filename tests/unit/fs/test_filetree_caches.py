"""A mount keeps the caches of its most recently used file trees only."""

from snapfs.fs.filetree import FileTree, FileTrees


class Reader:
    """A GuestFs stand-in that counts how often its caches were dropped."""
    recovered = None
    root = 2

    def __init__(self):
        self.drops = 0

    def drop_caches(self):
        self.drops += 1


def _tree(trees, tree_id):
    tree = FileTree(tree_id, Reader(), view=None, label=f"t{tree_id}")
    tree.used = trees.used
    return tree


def test_only_the_most_recently_used_trees_keep_their_caches():
    trees = FileTrees(cached=2)
    a, b, c = (_tree(trees, i) for i in (1, 2, 3))
    start = [t.fs.drops for t in (a, b, c)]
    for tree in (a, b, a, a, c):
        trees.used(tree)
    # b was used longest ago when c came: it alone let go.
    assert [t.fs.drops - s for t, s in zip((a, b, c), start)] == [0, 1, 0]
    a._stats.get_or(5, lambda: "stat")
    trees.used(b)                   # a is now the oldest of three
    assert a.fs.drops - start[0] == 1 and 5 not in a._stats
