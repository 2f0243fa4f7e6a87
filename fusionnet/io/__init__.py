"""Input and output shared by every part of the library: image decoding (`images`), file hashing
(`hashing`). Nothing here imports the network."""
