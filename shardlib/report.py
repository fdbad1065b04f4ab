"""Moved: this module only says where (``shardlib._moved``)."""

from shardlib._moved import moved

moved(__spec__.name, __name__ == "__main__")
