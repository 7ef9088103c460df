"""Guest filesystems inside the disk views: partition tables, and
read-only trees of files read with well-kept parsers (dissect.*)."""
