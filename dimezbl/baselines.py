"""The DimeNet column that the DimezblNet paper quotes, checked against DimeNet's own paper.

DimeNet's own MAEs (Gasteiger, Groß & Günnemann, ICLR 2020) are kept as the strings printed there;
None marks a cell not yet read from that paper (DIMENET_PAPER_SOURCE says what was read, and where).
Units: QM9 as in `dimezbl_core.QM9_REPORTING_UNITS` (mu D, alpha bohr^3, r2 bohr^2, cv cal/(mol K),
the rest meV); MD17 energies kcal/mol, forces kcal/mol/A.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd

import dimezbl_core as dc

DIMENET_PAPER_SOURCE = {
    "citation": ("J. Gasteiger, J. Groß, S. Günnemann, 'Directional Message Passing for Molecular Graphs', "
                 "ICLR 2020"),
    "arxiv_id": "2003.03123",
    # The numbers of DimeNet's QM9 and MD17 tables in that paper, and the copy they were read from:
    # None until they are read.
    "qm9_table": None,
    "md17_table": None,
    "url": None,
    # Stored copies of the paper whose text was found but whose tables could not be opened here
    # (only the first page of each was readable).
    "copies_found": (
        "https://hf-p-cfw.fyan.top/datasets/google/spiqa/resolve/576140b7eed8e63bc200683edb88986ae092b2e3/"
        "SPIQA_train_val_test-A_raw_tex.zip?download=true:/tmp/tarfile_extract_5thyelr8/"
        "SPIQA_train_val_test-A_raw_tex/2003.03123v2.txt",
        "https://object.cloud.sdsc.edu/v1/AUTH_da4962d3368042ac8337e2dfdd3e7bf3/ml-papers-txt/ICLR/2020/"
        "directional_message_passing_for_molecular_graphs__09bdb894.txt",
        "https://vdocuments.net/directional-m-passing-for-molecular-g-arxiv.html",
    ),
}

# QM9 target (keys of dc.PAPER_TABLE1) -> MAE as printed in DimeNet's QM9 table.
DIMENET_PAPER_TABLE1: dict[str, Optional[str]] = {
    "mu": None,  # D
    "alpha": None,  # bohr^3
    "homo": None,  # meV
    "lumo": None,  # meV
    "gap": None,  # meV
    "r2": None,  # bohr^2
    "zpve": None,  # meV
    "U0": None,  # meV
    "U": None,  # meV
    "H": None,  # meV
    "G": None,  # meV
    "cv": None,  # cal/(mol K)
}

# (MD17 molecule, "energy" | "forces") -> MAE as printed in DimeNet's MD17 table (DimeNet column);
# energy in kcal/mol, forces in kcal/mol/A.
DIMENET_PAPER_TABLE2: dict[tuple[str, str], Optional[str]] = {
    (molecule, quantity): None for molecule in dc.MD17_LABELS for quantity in dc.MD17_QUANTITIES
}

COMPARISON_COLUMNS = ("table", "row", "quantity", "unit", "quoted_in_paper", "dimenet_paper",
                      "relative_difference_percent", "agrees")


def _comparison_row(table: int, row, quantity: str, unit: str, quoted: Optional[str],
                    own: Optional[str]) -> dict:
    quoted_value = dc.paper_value(table, row, "DimeNet")
    own_value = None if own is None else float(own)
    comparable = quoted_value is not None and own_value is not None
    return {
        "table": table,
        "row": row if table == 1 else row[0],
        "quantity": quantity,
        "unit": unit,
        "quoted_in_paper": quoted,
        "dimenet_paper": own,
        "relative_difference_percent": (100.0 * (quoted_value - own_value) / own_value
                                        if comparable else float("nan")),
        "agrees": (quoted_value == own_value) if comparable else None,
    }


def baseline_comparison() -> pd.DataFrame:
    """One row per DimeNet cell of the DimezblNet paper's Tables 1 (QM9) and 2 (MD17).

    `quoted_in_paper` is that paper's DimeNet cell and `dimenet_paper` DimeNet's own value (strings as
    printed; None where there is none); `relative_difference_percent` is 100 * (quoted - own) / own and
    `agrees` is True when both give the same float (NaN and <NA> where either is missing).
    """
    column = dc.PAPER_TABLE1_COLUMNS.index("DimeNet")
    rows = [_comparison_row(1, target, label, dc.QM9_REPORTING_UNITS[target], cells[column],
                            DIMENET_PAPER_TABLE1[target])
            for target, (label, _, cells) in dc.PAPER_TABLE1.items()]
    column = dc.PAPER_TABLE2_COLUMNS.index("DimeNet")
    rows += [_comparison_row(2, key, key[1], dc.MD17_UNITS[key[1]], cells[column], DIMENET_PAPER_TABLE2[key])
             for key, cells in dc.PAPER_TABLE2.items()]
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS)).astype({"agrees": "boolean"})


def _markdown_row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def baseline_markdown() -> str:
    """A Markdown table of the DimeNet cells whose quoted value differs from DimeNet's own, then a count."""
    comparison = baseline_comparison()
    differ = comparison[comparison["agrees"].eq(False).fillna(False)]
    agree = int(comparison["agrees"].eq(True).fillna(False).sum())
    missing = int(comparison["agrees"].isna().sum())
    if differ.empty:
        lines = ["No compared DimeNet cell differs."]
    else:
        lines = [_markdown_row(["Table", "Row", "Quantity", "Unit", "Quoted (DimezblNet paper)",
                                "DimeNet paper", "Difference (%)"]),
                 _markdown_row(["---"] * 7)]
        lines += [_markdown_row([r.table, dc.MD17_LABELS.get(r.row, r.row), r.quantity, r.unit,
                                 r.quoted_in_paper, r.dimenet_paper, f"{r.relative_difference_percent:+.1f}"])
                  for r in differ.itertuples(index=False)]
    lines += ["", f"{agree} of {len(comparison)} DimeNet cells agree with DimeNet's own paper, {len(differ)} differ, "
                  f"{missing} cannot be compared (no value on one side)."]
    return "\n".join(lines) + "\n"
