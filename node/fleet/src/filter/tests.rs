use proptest::prelude::*;

use super::*;

fn inv(pairs: &[(&str, &str)]) -> Inventory {
    pairs.iter().copied().collect()
}

fn parse(text: &str) -> Filter {
    text.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn err(text: &str) -> ParseError {
    text.parse::<Filter>().expect_err(text)
}

#[test]
fn parses_the_example_from_the_brief() {
    let f = parse("device_type=acme-board and region in (eu,us)");
    assert_eq!(
        f.terms(),
        &[
            Term {
                attribute: "device_type".into(),
                condition: Condition::Eq("acme-board".into())
            },
            Term {
                attribute: "region".into(),
                condition: Condition::In(vec!["eu".into(), "us".into()])
            },
        ]
    );
    assert!(f.matches(&inv(&[("device_type", "acme-board"), ("region", "us")])));
    assert!(!f.matches(&inv(&[("device_type", "acme-board"), ("region", "apac")])));
    assert!(!f.matches(&inv(&[("device_type", "other"), ("region", "eu")])));
    assert!(!f.matches(&inv(&[("device_type", "acme-board")])));
}

#[test]
fn every_operator_matches_as_documented() {
    let d = inv(&[
        ("a", "1"),
        ("a", "x"),
        ("ram_mb", "512"),
        ("ver", "2.5"),
        ("name", "a b"),
    ]);
    let cases: &[(&str, bool)] = &[
        ("a=x", true),
        ("a=1", true),
        ("a=y", false),
        ("a!=y", true),
        ("a!=x", false),
        ("missing!=x", true),
        ("a in (y,x)", true),
        ("a in (y,z)", false),
        ("a not in (y,z)", true),
        ("a not in (z,1)", false),
        ("missing not in (z)", true),
        ("missing in (z)", false),
        ("a exists", true),
        ("missing exists", false),
        ("missing not exists", true),
        ("a not exists", false),
        ("ram_mb>=512", true),
        ("ram_mb>512", false),
        ("ram_mb<=512", true),
        ("ram_mb<512", false),
        ("ram_mb<1e3", true),
        ("ver>2.4", true),
        ("ver<2.5", false),
        ("ver>-1", true),
        // "x" is not a number; "1" is, and it decides.
        ("a<2", true),
        ("a>2", false),
        ("missing>0", false),
        ("name=\"a b\"", true),
        ("name=a", false),
        ("ram_mb>=512 and a=x and ver<3", true),
        ("ram_mb>=512 and a=nope", false),
        ("A=x", false),
        ("a IN (x) AND ram_mb Exists", true),
    ];
    for (text, want) in cases {
        assert_eq!(parse(text).matches(&d), *want, "{text}");
    }
}

#[test]
fn non_numbers_never_compare() {
    let d = inv(&[("n", "nan"), ("i", "inf"), ("h", "0x10"), ("e", "")]);
    for text in ["n<1", "n>1", "i>1", "i<1", "h>1", "h<100", "e<1", "e>=0"] {
        assert!(!parse(text).matches(&d), "{text}");
    }
}

#[test]
fn keywords_are_names_where_a_name_is_expected() {
    let f = parse("and=in and not exists and in in (and)");
    assert_eq!(
        f.terms(),
        &[
            Term {
                attribute: "and".into(),
                condition: Condition::Eq("in".into())
            },
            Term {
                attribute: "not".into(),
                condition: Condition::Exists
            },
            Term {
                attribute: "in".into(),
                condition: Condition::In(vec!["and".into()])
            },
        ]
    );
}

#[test]
fn quoted_strings_unescape() {
    let f = parse(r#""my attr"="say \"hi\" \\ bye""#);
    assert_eq!(
        f.terms(),
        &[Term {
            attribute: "my attr".into(),
            condition: Condition::Eq(r#"say "hi" \ bye"#.into())
        }]
    );
    assert_eq!(f.to_string(), r#""my attr"="say \"hi\" \\ bye""#);
}

#[test]
fn malformed_filters_get_specific_errors() {
    let end = |s: &str| s.len();
    let cases: Vec<(&str, ParseError)> = vec![
        ("", ParseError::Empty),
        ("   \t ", ParseError::Empty),
        (
            "a",
            ParseError::ExpectedOperator {
                at: 1,
                found: END.into(),
            },
        ),
        (
            "a b",
            ParseError::ExpectedOperator {
                at: 2,
                found: "`b`".into(),
            },
        ),
        (
            "a=",
            ParseError::ExpectedValue {
                at: 2,
                found: END.into(),
            },
        ),
        (
            "a=(",
            ParseError::ExpectedValue {
                at: 2,
                found: "`(`".into(),
            },
        ),
        (
            "=x",
            ParseError::ExpectedAttribute {
                at: 0,
                found: "`=`".into(),
            },
        ),
        (
            "a=x and",
            ParseError::ExpectedAttribute {
                at: end("a=x and"),
                found: END.into(),
            },
        ),
        (
            "a=x or b=y",
            ParseError::ExpectedAnd {
                at: 4,
                found: "`or`".into(),
            },
        ),
        (
            "a=x b=y",
            ParseError::ExpectedAnd {
                at: 4,
                found: "`b`".into(),
            },
        ),
        (
            "a=x and and",
            ParseError::ExpectedOperator {
                at: 11,
                found: END.into(),
            },
        ),
        (
            "a in",
            ParseError::ExpectedList {
                at: 4,
                found: END.into(),
            },
        ),
        (
            "a in x",
            ParseError::ExpectedList {
                at: 5,
                found: "`x`".into(),
            },
        ),
        ("a in ()", ParseError::EmptyList { at: 5 }),
        (
            "a in (x",
            ParseError::UnclosedList {
                at: 7,
                found: END.into(),
            },
        ),
        (
            "a in (x y)",
            ParseError::UnclosedList {
                at: 8,
                found: "`y`".into(),
            },
        ),
        (
            "a in (x,)",
            ParseError::ExpectedValue {
                at: 8,
                found: "`)`".into(),
            },
        ),
        (
            "a not",
            ParseError::ExpectedOperator {
                at: 5,
                found: END.into(),
            },
        ),
        (
            "a not equal",
            ParseError::ExpectedOperator {
                at: 6,
                found: "`equal`".into(),
            },
        ),
        (
            "a<x",
            ParseError::ExpectedNumber {
                at: 2,
                found: "`x`".into(),
            },
        ),
        (
            "a<nan",
            ParseError::ExpectedNumber {
                at: 2,
                found: "`nan`".into(),
            },
        ),
        (
            "a>=inf",
            ParseError::ExpectedNumber {
                at: 3,
                found: "`inf`".into(),
            },
        ),
        (
            "a>1e999",
            ParseError::ExpectedNumber {
                at: 2,
                found: "`1e999`".into(),
            },
        ),
        (
            "a>",
            ParseError::ExpectedNumber {
                at: 2,
                found: END.into(),
            },
        ),
        ("a!x", ParseError::LoneBang { at: 1 }),
        ("a=\"x", ParseError::UnterminatedString { at: 2 }),
        ("a=\"x\\n\"", ParseError::InvalidEscape { at: 4 }),
        ("a=\"x\\", ParseError::InvalidEscape { at: 4 }),
    ];
    for (text, want) in cases {
        assert_eq!(err(text), want, "{text:?}");
    }
}

#[test]
fn limits_are_enforced() {
    let long = format!("a={}", "x".repeat(TEXT_LEN_MAX));
    assert_eq!(
        err(&long),
        ParseError::TooLong {
            len: TEXT_LEN_MAX + 2,
            max: TEXT_LEN_MAX
        }
    );
    let many = vec!["a=1"; TERMS_MAX + 1].join(" and ");
    assert_eq!(err(&many), ParseError::TooManyTerms { max: TERMS_MAX });
    let enough = vec!["a=1"; TERMS_MAX].join(" and ");
    assert_eq!(parse(&enough).terms().len(), TERMS_MAX);
    let list = |n: usize| format!("a in ({})", vec!["v"; n].join(","));
    assert_eq!(
        err(&list(LIST_LEN_MAX + 1)),
        ParseError::TooManyValues {
            at: 5,
            max: LIST_LEN_MAX
        }
    );
    assert!(
        matches!(parse(&list(LIST_LEN_MAX)).terms()[0].condition, Condition::In(ref v) if v.len() == LIST_LEN_MAX)
    );
}

#[test]
fn serde_stores_the_text_and_checks_it_on_load() {
    let f = parse("device_type=acme-board and ram_mb>=512");
    let json = serde_json::to_string(&f).unwrap();
    assert_eq!(json, "\"device_type=acme-board and ram_mb>=512\"");
    assert_eq!(serde_json::from_str::<Filter>(&json).unwrap(), f);
    let bad = serde_json::from_str::<Filter>("\"a=x or b=y\"").unwrap_err();
    assert!(bad.to_string().contains("expected `and`"), "{bad}");
}

#[test]
fn filter_new_refuses_empty_and_oversized() {
    assert!(Filter::new(vec![]).is_none());
    let t = Term {
        attribute: "a".into(),
        condition: Condition::Exists,
    };
    assert!(Filter::new(vec![t.clone(); TERMS_MAX + 1]).is_none());
    assert_eq!(Filter::new(vec![t.clone()]).unwrap().terms(), &[t]);
}

fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_][a-z0-9_.-]{0,8}",
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
        Just("and".to_owned()),
        Just("not".to_owned()),
        Just(String::new()),
    ]
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![any::<i32>().prop_map(f64::from), -1e12f64..1e12f64]
}

fn condition() -> impl Strategy<Value = Condition> {
    let list = || prop::collection::vec(atom(), 1..4);
    prop_oneof![
        atom().prop_map(Condition::Eq),
        atom().prop_map(Condition::Ne),
        list().prop_map(Condition::In),
        list().prop_map(Condition::NotIn),
        Just(Condition::Exists),
        Just(Condition::NotExists),
        number().prop_map(Condition::Lt),
        number().prop_map(Condition::Le),
        number().prop_map(Condition::Gt),
        number().prop_map(Condition::Ge),
    ]
}

proptest! {
    #[test]
    fn display_parses_back_to_the_same_filter(
        terms in prop::collection::vec((atom(), condition()), 1..6)
    ) {
        let terms: Vec<Term> = terms.into_iter().map(|(attribute, condition)| Term { attribute, condition }).collect();
        let f = Filter::new(terms).unwrap();
        let text = f.to_string();
        prop_assert_eq!(text.parse::<Filter>(), Ok(f), "{}", text);
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = text.parse::<Filter>();
    }

    #[test]
    fn ne_is_the_negation_of_eq_and_not_in_of_in(
        values in prop::collection::vec("[a-c]", 0..3),
        probe in "[a-c]",
    ) {
        let d: Inventory = values.iter().map(|v| ("k", v.as_str())).collect();
        let eq = Term { attribute: "k".into(), condition: Condition::Eq(probe.clone()) };
        let ne = Term { attribute: "k".into(), condition: Condition::Ne(probe.clone()) };
        prop_assert_ne!(eq.matches(&d), ne.matches(&d));
        let is = Term { attribute: "k".into(), condition: Condition::In(vec![probe.clone()]) };
        let not = Term { attribute: "k".into(), condition: Condition::NotIn(vec![probe]) };
        prop_assert_eq!(is.matches(&d), eq.matches(&d));
        prop_assert_ne!(is.matches(&d), not.matches(&d));
    }
}
