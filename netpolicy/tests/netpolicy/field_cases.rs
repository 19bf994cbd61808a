//! field_cases
