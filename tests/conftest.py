import os

# keep tests from reading a user's data folder: the packaged data and ../shared are found
# through the default search order
os.environ.pop("HASHRET_DATA", None)
