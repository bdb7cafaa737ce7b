"""What every report and study shares: the numbers, the figures, the page.

| module      | one idea                                                             |
|-------------|----------------------------------------------------------------------|
| ``stats``   | mean ± spread over seeds, paired differences with a 95% t interval,  |
|             | the verdict vocabulary (supported / contradicted / inconclusive)     |
| ``figures`` | one palette (a normalization or case has one colour everywhere),     |
|             | figures without pyplot state, mean ± spread lines                    |
| ``page``    | Markdown → one self-contained HTML page (markdown-it-py)             |

The evidence layer reads numbers and files; it never trains and imports nothing from bnlab.
"""
