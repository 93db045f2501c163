"""Verification: torrent pieces, checksum files, split files, weight file structure, reports."""
from verify.checksums import parse_checksums, verify_checksums
from verify.folder import find_checksum_files, verify_folder
from verify.pieces import verify_pieces
from verify.report import Finding, Report
from verify.splits import SplitReader, join, split_parts
from verify.structure import check_structure, pth_tensors, safetensors_tensors

__all__ = ["parse_checksums", "verify_checksums", "find_checksum_files", "verify_folder", "verify_pieces",
           "Finding", "Report", "SplitReader", "join", "split_parts", "check_structure", "pth_tensors",
           "safetensors_tensors"]
