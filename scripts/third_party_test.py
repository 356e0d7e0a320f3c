#!/usr/bin/env python3
"""Tests of scripts/third-party.py's licence logic (run by scripts/test-yocto.sh):

    python3 scripts/third_party_test.py
"""

import importlib.util
import os
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("third_party", os.path.join(HERE, "third-party.py"))
tp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tp)


def parse(text):
    return tp.parse_expression(text, "test crate")


class Expressions(unittest.TestCase):
    def test_the_same_licence_written_three_ways_is_one_group(self):
        self.assertEqual(parse("MIT OR Apache-2.0"), parse("Apache-2.0/MIT"))
        self.assertEqual(parse("MIT OR Apache-2.0"), parse("(Apache-2.0 OR MIT)"))
        self.assertEqual(tp.spdx(parse("MIT/Apache-2.0")), "Apache-2.0 OR MIT")

    def test_the_three_syntaxes(self):
        tree = parse("Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT")
        self.assertEqual(tp.bitbake(tree), "Apache-2.0 | Apache-2.0-with-LLVM-exception | MIT")
        self.assertEqual(tp.dep5(tree), "Apache-2.0 or Apache-2.0 with LLVM exception or MIT")
        self.assertEqual(tp.dep5_names(tree), {"Apache-2.0", "Apache-2.0 with LLVM exception", "MIT"})
        tree = parse("(MIT OR Apache-2.0) AND Unicode-3.0")
        self.assertEqual(tp.bitbake(tree), "(Apache-2.0 | MIT) & Unicode-3.0")
        self.assertEqual(tp.spdx(tree), "(Apache-2.0 OR MIT) AND Unicode-3.0")

    def test_dep5_groups_with_a_comma_not_parentheses(self):
        self.assertEqual(tp.dep5(parse("(MIT OR Apache-2.0) AND Unicode-3.0")),
                         "Apache-2.0 or MIT, and Unicode-3.0")
        # `and` binds tighter than `or`: no grouping needed.
        self.assertEqual(tp.dep5(parse("MIT AND BSD-3-Clause OR Apache-2.0")),
                         "Apache-2.0 or BSD-3-Clause and MIT")
        self.assertEqual(tp.dep5(parse("Apache-2.0 AND ISC")), "Apache-2.0 and ISC")
        with self.assertRaises(SystemExit):
            tp.dep5(parse("(MIT OR (ISC AND Zlib)) AND Unicode-3.0"))

    def test_unreadable_expressions_are_refused(self):
        for text in ("", "MIT OR", "(MIT", "MIT; Apache-2.0", "MIT AND AND ISC"):
            with self.subTest(text=text), self.assertRaises(SystemExit):
                parse(text)


class AllowList(unittest.TestCase):
    def test_a_licence_outside_it_is_refused_unless_a_choice_is_inside(self):
        self.assertTrue(tp.acceptable(parse("Apache-2.0 AND ISC")))
        self.assertFalse(tp.acceptable(parse("GPL-3.0-only")))
        self.assertFalse(tp.acceptable(parse("MIT AND LGPL-2.1-or-later")))
        self.assertTrue(tp.acceptable(parse("MIT OR LGPL-2.1-or-later")))
        self.assertTrue(tp.acceptable(parse("Apache-2.0 WITH LLVM-exception")))
        self.assertFalse(tp.acceptable(parse("GPL-2.0-only WITH Classpath-exception-2.0")))

    def test_every_allowed_licence_has_its_text(self):
        for name in tp.ALLOWED - set(tp.DEBIAN_COMMON):
            with self.subTest(name=name):
                self.assertTrue(os.path.isfile(os.path.join(tp.LICENSES, f"{name}.txt")))


class PackageLicence(unittest.TestCase):
    def test_a_choice_is_dropped_only_when_one_of_its_licences_is_required(self):
        own = parse("Apache-2.0")
        trees = [parse(t) for t in ("MIT", "MIT OR Apache-2.0", "Apache-2.0 AND ISC",
                                    "(MIT OR Apache-2.0) AND Unicode-3.0")]
        self.assertEqual(tp.package_licence(own, trees), "Apache-2.0 & ISC & MIT & Unicode-3.0")
        trees = [parse(t) for t in ("MIT", "ISC OR BSL-1.0")]
        self.assertEqual(tp.package_licence(own, trees), "Apache-2.0 & (BSL-1.0 | ISC) & MIT")

    def test_our_own_licence_is_in_it_when_no_crate_requires_it(self):
        trees = [parse("MIT OR Apache-2.0"), parse("MIT OR Unlicense")]
        self.assertEqual(tp.package_licence(parse("Apache-2.0"), trees),
                         "Apache-2.0 & (MIT | Unlicense)")


class Holders(unittest.TestCase):
    def test_notices_not_licence_sentences_nor_templates(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "LICENSE-MIT"), "w") as f:
                f.write("Copyright (c) 2014 Alex Crichton\n"
                        "Copyright (c) <year> <copyright holders>\n"
                        "The above copyright notice and this permission notice shall be\n")
            with open(os.path.join(d, "LICENSE-APACHE"), "w") as f:
                f.write("copyright license to reproduce, prepare Derivative Works of,\n"
                        "   Copyright [yyyy] [name of copyright owner]\n"
                        "© 2020 Someone Else\n")
            with open(os.path.join(d, "README.md"), "w") as f:
                f.write("Copyright 2019 Not A Licence File\n")
            self.assertEqual(tp.holders(d, ["Ignored <a@b>"], "x"),
                             ["2020 Someone Else", "2014 Alex Crichton"])
            os.remove(os.path.join(d, "LICENSE-MIT"))
            os.remove(os.path.join(d, "LICENSE-APACHE"))
            self.assertEqual(tp.holders(d, ["A <a@b>"], "x"), ["A <a@b>"])
            self.assertEqual(tp.holders(d, [], "x"), ["the x authors"])


if __name__ == "__main__":
    unittest.main(verbosity=1)
